"""Per-class annotation counts a reader logs once: how many were read, how many skipped and why."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

logger = logging.getLogger("mask2former.data")


class AnnotationCounts:
    """``read(name)`` / ``skip(name, reason)`` while loading; ``log(where)`` writes one line per class."""

    def __init__(self) -> None:
        self.read_counts: Counter[str] = Counter()
        self.skipped: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def read(self, name: str) -> None:
        self.read_counts[name] += 1

    def skip(self, name: str, reason: str) -> None:
        self.skipped[name][reason] += 1

    def summary(self) -> dict[str, dict[str, object]]:
        names = list(dict.fromkeys([*self.read_counts, *self.skipped]))
        return {name: {"read": self.read_counts.get(name, 0), "skipped": dict(self.skipped.get(name, {}))}
                for name in names}

    def log(self, where: str) -> None:
        for name, counts in self.summary().items():
            skipped = counts["skipped"]
            reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items())  # type: ignore[union-attr]
            total = sum(skipped.values())  # type: ignore[union-attr]
            line = f"{where}: class {name!r}: {counts['read']} annotation(s) read, {total} skipped"
            # Skips are warnings so that they show even where only warnings are printed.
            (logger.warning if total else logger.info)(line + (f" ({reasons})" if reasons else ""))
