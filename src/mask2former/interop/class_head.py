"""Carry a trained class head over to another label space by class *name* (fine-tuning, ``model.weights``).

The tensors whose rows are classes: ``class_embed`` (``[K + 1, D]`` weight, ``[K + 1]`` bias; the last row is the
"no object" class) and MP-Former's ``label_embed`` (``[K, D]``). A class the checkpoint's label space and the new
one share keeps its trained row, bit for bit; the no-object row is kept; every other row keeps the new model's
initialisation. Names match exactly, else case-insensitively with runs of spaces/underscores read as one space
("Ankle boot" = "ankle_boot"); a name that is ambiguous that way matches only exactly.

Without the checkpoint's class names (a detectron2 ``.pkl`` of an unknown preset) only the class count can be
used: with as many classes as the data set the rows are copied by position (the usual assumption of detectron2,
mmdet and transformers when shapes fit), else only the no-object row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

CLASS_WEIGHT = "transformer_decoder.heads.class_embed.weight"
CLASS_BIAS = "transformer_decoder.heads.class_embed.bias"
LABEL_EMBED = "transformer_decoder.label_embed.weight"
# key -> whether its last row is the no-object class
CLASS_ROW_KEYS = {CLASS_WEIGHT: True, CLASS_BIAS: True, LABEL_EMBED: False}


def _normalise(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name.strip()).casefold()


@dataclass
class ClassMatch:
    """How the checkpoint's classes map onto the new ones: ``pairs`` of (checkpoint index, new index)."""

    pairs: list[tuple[int, int]]
    old_names: list[str] | None
    new_names: list[str]
    by_position: bool = False  # no names in the checkpoint: matched by index (same class count)
    reinitialised: list[str] = field(default_factory=list)  # tensors whose class rows were (partly) re-initialised

    @property
    def new_classes(self) -> list[str]:
        matched = {new for _, new in self.pairs}
        return [name for index, name in enumerate(self.new_names) if index not in matched]

    @property
    def dropped_classes(self) -> list[str]:
        if self.old_names is None:
            return []
        matched = {old for old, _ in self.pairs}
        return [name for index, name in enumerate(self.old_names) if index not in matched]

    def summary(self) -> str:
        """The log lines: how many classes matched, which, which are new, which tensors were re-initialised."""
        total = len(self.new_names)
        if self.old_names is None:
            how = ("the checkpoint has no class names: copied its class rows by position (same class count)"
                   if self.by_position else
                   "the checkpoint has no class names and another class count: no class rows copied")
            lines = [f"class head: {how}; {len(self.pairs)} of {total} classes kept, no-object row kept"]
        else:
            shared = ", ".join(self.new_names[new] for _, new in self.pairs) or "none"
            lines = [f"class head: {len(self.pairs)} of {total} classes matched by name ({shared}); "
                     f"no-object row kept"]
            new = self.new_classes
            if new:
                lines.append(f"class head: {len(new)} new classes start from a fresh initialisation: {', '.join(new)}")
            dropped = self.dropped_classes
            if dropped:
                lines.append(f"class head: {len(dropped)} checkpoint classes not in the data set, not used: "
                             f"{', '.join(dropped)}")
        if self.reinitialised:
            lines.append(f"class head: re-initialised rows in {', '.join(self.reinitialised)}")
        return "\n".join(lines)


def match_classes(old_names: Sequence[str] | None, new_names: Sequence[str], old_count: int) -> ClassMatch:
    """Pairs of (checkpoint index, new index) for the classes both label spaces hold (see the module doc)."""
    new_names = list(new_names)
    if old_names is None:
        if old_count == len(new_names):
            return ClassMatch([(i, i) for i in range(old_count)], None, new_names, by_position=True)
        return ClassMatch([], None, new_names)
    old_names = list(old_names)
    if len(old_names) != old_count:
        raise ValueError(f"the checkpoint names {len(old_names)} classes but its class head has {old_count}")
    old_exact = {name: index for index, name in enumerate(old_names)}
    old_loose: dict[str, list[int]] = {}
    for index, name in enumerate(old_names):
        old_loose.setdefault(_normalise(name), []).append(index)
    new_loose: dict[str, int] = {}
    for name in new_names:
        new_loose[_normalise(name)] = new_loose.get(_normalise(name), 0) + 1
    pairs = []
    for new_index, name in enumerate(new_names):
        if name in old_exact:
            pairs.append((old_exact[name], new_index))
            continue
        candidates = old_loose.get(_normalise(name), [])
        if len(candidates) == 1 and new_loose[_normalise(name)] == 1 and old_names[candidates[0]] not in new_names:
            pairs.append((candidates[0], new_index))
    return ClassMatch(pairs, old_names, new_names)


def transfer_class_rows(checkpoint: dict[str, Tensor], fresh: dict[str, Tensor], match: ClassMatch
                        ) -> dict[str, Tensor]:
    """The class-row tensors for the new model: ``fresh`` (the new model's initialisation) with the matched rows
    and the no-object row taken from ``checkpoint``. Only keys present in both are built; the width (``D``) must
    agree (the caller checks shapes). Records the re-initialised tensors in ``match.reinitialised``."""
    out: dict[str, Tensor] = {}
    for key, has_no_object in CLASS_ROW_KEYS.items():
        if key not in checkpoint or key not in fresh:
            continue
        old, new = checkpoint[key], fresh[key].clone()
        if old.shape[1:] != new.shape[1:]:
            raise ValueError(f"tensor {key} has shape {tuple(old.shape)} in the checkpoint but the model expects "
                             f"{tuple(new.shape)} (only the class count may differ)")
        old_classes = old.shape[0] - int(has_no_object)
        pairs = [(o, n) for o, n in match.pairs if o < old_classes]
        if pairs:
            old_rows = torch.tensor([o for o, _ in pairs])
            new_rows = torch.tensor([n for _, n in pairs])
            new[new_rows] = old[old_rows].to(new.dtype)
        if has_no_object:
            new[-1] = old[-1].to(new.dtype)
        if len(pairs) < new.shape[0] - int(has_no_object):
            match.reinitialised.append(key)
        out[key] = new
    return out


__all__ = ["CLASS_BIAS", "CLASS_ROW_KEYS", "CLASS_WEIGHT", "LABEL_EMBED", "ClassMatch", "match_classes",
           "transfer_class_rows"]
