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
        """One INFO line with the annotations read per class; one WARNING line per class with skipped ones."""
        summary = self.summary()
        read = ", ".join(f"{name} {counts['read']}" for name, counts in summary.items())
        logger.info(f"{where}: {sum(self.read_counts.values())} annotation(s) read ({read or 'none'})")
        for name, counts in summary.items():
            skipped: dict[str, int] = counts["skipped"]  # type: ignore[assignment]
            if skipped:
                reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items())
                logger.warning(f"{where}: class {name!r}: {sum(skipped.values())} annotation(s) skipped ({reasons})")
