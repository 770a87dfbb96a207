"""``data.val_fraction``: a deterministic validation split held out of a data set that has only one split.

Which images go to validation depends only on each image's name and ``data.seed`` (a keyed hash ranks them), so the
split is the same whatever order the files are listed in, and adding images moves none of the others.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Sequence

from torch.utils.data import Dataset

logger = logging.getLogger("mask2former.data")


class SubsetDataset(Dataset):
    """The samples ``indices`` of ``dataset``, keeping its ``label_space``."""

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.label_space = dataset.label_space

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]

    def sample_keys(self) -> list[str]:
        keys = sample_keys(self.dataset)
        return [keys[index] for index in self.indices]


def sample_keys(dataset: Any) -> list[str]:
    """A stable name per sample: the reader's ``sample_keys()`` (file names) where it has one, else the index."""
    keys = dataset.sample_keys() if hasattr(dataset, "sample_keys") else [str(i) for i in range(len(dataset))]
    if len(set(keys)) != len(keys):
        raise ValueError("data.val_fraction: the data set's sample names are not unique")
    return keys


def holdout_indices(keys: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train indices, val indices)``: the ``round(fraction * N)`` samples (at least 1 when ``fraction > 0`` and
    N > 1) whose keyed hash is smallest go to validation; both lists ascending."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {fraction}")
    count = len(keys)
    if count < 2:
        raise ValueError(f"data.val_fraction={fraction}: the data set has {count} image(s); need at least 2")
    num_val = min(max(1, round(fraction * count)), count - 1)
    rank = sorted(range(count), key=lambda index: (hashlib.sha256(f"{seed}\0{keys[index]}".encode()).digest(),
                                                   keys[index]))
    val = sorted(rank[:num_val])
    chosen = set(val)
    return [index for index in range(count) if index not in chosen], val


def hold_out(train_dataset: Any, val_dataset: Any, fraction: float, seed: int, where: str = "") -> tuple[Any, Any]:
    """Split one data set read twice (``train_dataset`` with the training transforms, ``val_dataset`` without)
    into ``(train subset, val subset)`` and log how many images went where."""
    keys = sample_keys(train_dataset)
    if sample_keys(val_dataset) != keys:
        raise ValueError("data.val_fraction: the two reads of the data set differ")
    train_indices, val_indices = holdout_indices(keys, fraction, seed)
    logger.info(f"data.val_fraction={fraction}{' ' + where if where else ''}: {len(train_indices)} image(s) for "
                f"training, {len(val_indices)} held out for validation (seed {seed})")
    return SubsetDataset(train_dataset, train_indices), SubsetDataset(val_dataset, val_indices)


__all__ = ["SubsetDataset", "hold_out", "holdout_indices", "sample_keys"]
