"""Deterministic, resumable data order for iteration-based training.

- :class:`TrainSampler` is an endless stream of ``(epoch, index)`` pairs: epoch ``e`` is a permutation drawn from
  (seed, e) alone, split across processes like ``DistributedSampler`` (padded to a multiple of the world size,
  process ``r`` takes positions ``r, r + W, r + 2W, ...``). It starts at any point of the stream, so a resumed run
  continues with exactly the next batch: the trainer counts the samples it consumed and restarts the sampler there.
- :class:`SeededDataset` runs ``dataset[index]`` with Python's, NumPy's and torch's global RNGs seeded from
  (seed, epoch, index) and restores them afterwards, so random augmentations depend on nothing else: not on the
  DataLoader worker that happens to load the sample, nor on the number of workers.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from ..data.collate import collate


def derive_seed(*values: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (NumPy's SeedSequence hashing: well mixed, stable)."""
    state = np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed Python's ``random``, NumPy's global RNG and torch's CPU RNG with ``seed`` for the body, then put the
    previous states back (the caller's random streams are untouched)."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class TrainSampler(Sampler):
    """Endless ``(epoch, index)`` stream for process ``rank`` of ``world_size``; ``start`` = samples of this
    process's stream to skip (the position to resume from)."""

    def __init__(self, dataset_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 start: int = 0) -> None:
        if dataset_size < 1:
            raise ValueError(f"TrainSampler: the training set is empty (size {dataset_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"TrainSampler: rank {rank} outside [0, {world_size})")
        if start < 0:
            raise ValueError(f"TrainSampler: start must be >= 0, got {start}")
        self.dataset_size = dataset_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.start = start

    @property
    def samples_per_epoch(self) -> int:
        """Samples this process sees per epoch (the data set padded to a multiple of the world size, divided)."""
        return -(-self.dataset_size // self.world_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """All indices of ``epoch`` in global order (before the split across processes), padded by repeating
        the start of the order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        padded = self.samples_per_epoch * self.world_size
        while len(order) < padded:
            order += order[: padded - len(order)]
        return order

    def epoch_indices(self, epoch: int) -> list[int]:
        """This process's indices for ``epoch``."""
        return self.epoch_order(epoch)[self.rank :: self.world_size]

    def position(self, samples_consumed: int) -> tuple[int, int]:
        """``(epoch, position within the epoch)`` after ``samples_consumed`` samples of this process's stream."""
        return divmod(samples_consumed, self.samples_per_epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, position = self.position(self.start)
        while True:
            for index in self.epoch_indices(epoch)[position:]:
                yield epoch, index
            epoch, position = epoch + 1, 0

    def state_dict(self, samples_consumed: int) -> dict[str, int]:
        """What a checkpoint needs to continue the stream after ``samples_consumed`` samples of this process."""
        epoch, position = self.position(samples_consumed)
        return {"seed": self.seed, "dataset_size": self.dataset_size, "world_size": self.world_size,
                "epoch": epoch, "position": position, "global_position": position * self.world_size,
                "samples_consumed": samples_consumed}

    def start_from_state(self, state: dict[str, int]) -> int:
        """Samples to skip in this sampler to continue a stream saved by :meth:`state_dict` (possibly with another
        world size: the epoch and the global position within it carry over)."""
        if state["dataset_size"] != self.dataset_size:
            raise ValueError(f"checkpoint data order is for a training set of {state['dataset_size']} samples, "
                             f"this one has {self.dataset_size}")
        if state["world_size"] == self.world_size:
            return int(state["samples_consumed"])
        return state["epoch"] * self.samples_per_epoch + -(-state["global_position"] // self.world_size)


class SeededDataset(Dataset):
    """``dataset`` indexed by ``(epoch, index)`` (or a plain index, read as epoch 0), with the global RNGs seeded
    from (``seed``, epoch, index) while the sample is loaded and transformed."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with seeded_rng(derive_seed(self.seed, epoch, index)):
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        # Reached only for attributes this wrapper lacks (label_space, ...): forward to the data set.
        if name in ("dataset", "seed"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def build_train_loader(dataset: Any, sampler: TrainSampler, batch_size: int, num_workers: int,
                       size_divisibility: int, pin_memory: bool) -> DataLoader:
    """Collated batches of ``batch_size`` samples in ``sampler``'s order, each sample loaded under its own seed
    (:class:`SeededDataset`)."""
    batches = BatchSampler(sampler, batch_size, drop_last=False)
    # An explicit generator keeps DataLoader from drawing its base seed from the global torch RNG (which would
    # make the training random stream depend on when iterators are created).
    generator = torch.Generator().manual_seed(derive_seed(sampler.seed, 3, sampler.rank))
    return DataLoader(
        SeededDataset(dataset, sampler.seed),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=partial(collate, size_divisibility=size_divisibility),
        pin_memory=pin_memory,
        generator=generator,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
    )
