"""Evaluation over the processes of a process group (``torchrun ... -m mask2former evaluate``, validation in
training): each process runs the model on a contiguous shard of the data set, rank 0 merges the per-image
statistics in data set order and computes the metrics, and every process gets the same result back.

Why the result equals one process's to the last bit: the shards are whole batches (``shard_range`` with the batch
size as its block), so every batch is the one a single process would run; and the merge keeps data set order
(contiguous shards in rank order), so PQ re-sums its per-image IoU sums in the same order, mIoU adds integer
confusion matrices, and AP numbers images and ground-truth segments exactly as one process does.

Failures: a process that raises sends its one-line error to the others at the next collective, and every process
then raises it (naming the rank). A process that dies makes the others' collective fail, with gloo at once (the
connection closes), with NCCL when the process group's timeout runs out; either becomes a one-line error here.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..data.image_io import one_line
from ..training import distributed as dist_utils

__all__ = ["ShardError", "process_group", "check_no_failure", "collective", "gather_to_main", "share_result"]

logger = logging.getLogger("mask2former.evaluate")


class ShardError(RuntimeError):
    """A process of the group failed (or was lost); raised on every process."""


def process_group() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group; ``(0, 1)`` without one."""
    if not dist_utils.is_distributed():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def collective(what: str, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, a collective; a lost process (closed connection, timeout) becomes a :class:`ShardError`."""
    try:
        return function(*args)
    except RuntimeError as error:  # gloo / NCCL errors (DistBackendError is a RuntimeError)
        raise ShardError(f"{what}: lost contact with another process (it stopped, or the process group timed "
                         f"out): {one_line(error)}") from error


def check_no_failure(error: str | None, what: str) -> None:
    """Every process passes its own error (None when it went well); all raise the first one if any failed."""
    rank, world = process_group()
    if world == 1:
        if error is not None:
            raise ShardError(f"{what}: {error}")
        return
    errors = collective(what, dist_utils.all_gather_object, error)
    for failed, message in enumerate(errors):
        if message is not None:
            raise ShardError(f"{what}: process {failed} of {world} failed: {message}")


def gather_to_main(obj: Any, what: str) -> list[Any] | None:
    """``obj`` of every process, by rank, on rank 0 (None elsewhere)."""
    return collective(what, dist_utils.gather_object, obj)


def share_result(compute: Callable[[], Any], what: str) -> Any:
    """``compute()`` on rank 0, its result (or its error) on every process."""
    rank, world = process_group()
    if world == 1:
        return compute()
    outcome: tuple[Any, str | None] = (None, None)
    if rank == 0:
        try:
            outcome = (compute(), None)
        except Exception as error:  # noqa: BLE001 - sent to the other processes, raised below on every one
            outcome = (None, one_line(error))
    result, error = collective(what, dist_utils.broadcast_object, outcome)
    if error is not None:
        raise ShardError(f"{what}: process 0 failed: {error}")
    return result


def warn_idle(num_items: int, num_parts: int, world: int, what: str) -> None:
    """Say once (rank 0) when some processes get nothing to do."""
    if process_group()[0] == 0 and num_parts < world:
        logger.warning("%s: %d processes for %d item(s) in %d batch(es): %d process(es) have nothing to do",
                       what, world, num_items, num_parts, world - num_parts)
