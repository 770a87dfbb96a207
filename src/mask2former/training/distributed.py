"""Multi-process training helpers (torchrun / torch.distributed).

Launch: ``torchrun --nproc_per_node N -m mask2former train ...``; torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` and :func:`init_distributed` reads them (NCCL on GPUs, gloo on
CPU). Without them everything runs in one process and the helpers below are no-ops.

Batch size: ``solver.batch_size`` is the GLOBAL batch (detectron2's ``IMS_PER_BATCH``), i.e. the number of images
per optimiser step summed over all processes and accumulation steps:
``global batch = per-device batch x world size x solver.accumulation_steps``. The reference's 16 on 8 GPUs is 2
images per GPU; on one GPU with ``accumulation_steps=8`` it is also 2 per forward pass.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistributedContext:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine, and its
    ``device``. ``owns_process_group``: :func:`init_distributed` created the group (so :func:`cleanup` destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        result = float(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not a number") from None
    if result <= 0:
        raise ValueError(f"environment variable {name}={value!r} must be positive")
    return result


def default_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str | torch.device | None = None, timeout_minutes: float = 30.0) -> DistributedContext:
    """Join the process group described by torchrun's environment variables (or reuse an initialised one).

    ``device``: ``None`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else CPU. The backend is NCCL for CUDA
    devices and gloo otherwise. ``timeout_minutes``: how long a collective waits for a missing process before it
    fails (environment ``MASK2FORMER_DIST_TIMEOUT_MINUTES`` overrides it, e.g. to fail fast in a job array)."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", rank)
        device = torch.device(device) if device is not None else default_device(local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistributedContext(rank, world_size, local_rank, device, owns_process_group=False)
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside [0, WORLD_SIZE={world_size})")
    device = torch.device(device) if device is not None else default_device(local_rank)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistributedContext(0, 1, local_rank, device)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout_minutes = _env_float("MASK2FORMER_DIST_TIMEOUT_MINUTES", timeout_minutes)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistributedContext(rank, world_size, local_rank, device, owns_process_group=True)


def cleanup(context: DistributedContext) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if context.owns_process_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for all processes (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_mean(values: dict[str, float | torch.Tensor], device: torch.device | None = None) -> dict[str, float]:
    """Mean of each scalar over all processes, as Python floats (one collective for the whole dict). Every process
    must pass the same keys in the same order."""
    if not values:
        return {}
    keys = list(values)
    if device is None:
        first = next((v for v in values.values() if isinstance(v, torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).detach().reshape(())
                           for k in keys])
    if is_distributed():
        if dist.get_backend() == "nccl" and stacked.device.type != "cuda":
            stacked = stacked.cuda()
        dist.all_reduce(stacked)
        stacked = stacked / dist.get_world_size()
    return dict(zip(keys, stacked.cpu().tolist()))


def all_reduce_any(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any process."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def all_gather_object(obj: Any) -> list[Any]:
    """List of ``obj`` from every process, by rank."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """List of ``obj`` from every process, by rank, on process ``dst``; None on the others."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def shard_range(length: int, index: int, count: int, block: int = 1) -> range:
    """Part ``index`` of ``count`` of ``range(length)``: contiguous, in whole blocks of ``block`` items (the last
    block may be short), spread as evenly as the blocks allow (the first ``blocks % count`` parts get one more).
    The parts in index order concatenate to ``range(length)``; with more parts than blocks the last ones are empty.

    Contiguous parts keep a merge in rank order equal to the one-process order, and ``block`` = the batch size
    keeps every batch the one a single process would run."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index} of {count}: need 0 <= index < count")
    if block < 1:
        raise ValueError(f"shard block size must be >= 1, got {block}")
    blocks = -(-length // block)
    base, extra = divmod(blocks, count)
    first = index * base + min(index, extra)
    last = first + base + (1 if index < extra else 0)
    return range(min(first * block, length), min(last * block, length))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process."""
    if not is_distributed():
        return obj
    container = [obj]
    dist.broadcast_object_list(container, src=src)
    return container[0]


def per_device_batch_size(global_batch_size: int, world_size: int, accumulation_steps: int) -> int:
    """Images per forward pass on one process: ``global / (world_size x accumulation_steps)``; raises when that
    is not a whole number."""
    if global_batch_size < 1 or world_size < 1 or accumulation_steps < 1:
        raise ValueError(f"solver.batch_size ({global_batch_size}), world size ({world_size}) and "
                         f"solver.accumulation_steps ({accumulation_steps}) must all be >= 1")
    per_pass = world_size * accumulation_steps
    if global_batch_size % per_pass:
        raise ValueError(
            f"solver.batch_size={global_batch_size} is the global batch and must be divisible by world size "
            f"({world_size}) x solver.accumulation_steps ({accumulation_steps}) = {per_pass}"
        )
    return global_batch_size // per_pass


def unused_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters that got no gradient in the last backward pass (call after one)."""
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


def probe_unused_parameters(model: nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device) -> list[str]:
    """One forward/backward (``loss_fn()``) without side effects (global RNGs, buffers and grads restored) to see
    which parameters get no gradient, which DDP must be told about. The caller restores its own generators."""
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    devices = [device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        loss_fn().backward()
    unused = unused_parameters(model)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    return unused


def wrap_ddp(model: nn.Module, context: DistributedContext, find_unused_parameters: bool = False,
             sync_batch_norm: bool = False) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (already on ``context.device``) when running distributed,
    else the model itself. Set ``find_unused_parameters`` only when some parameter gets no gradient in a step
    (it costs an extra graph traversal per step); the trainer decides it with one probe step.

    ``sync_batch_norm`` (``model.backbone.norm: SyncBN``): first turn ``model``'s batch norms, in place, into
    :class:`~.sync_batch_norm.SyncBatchNorm` (statistics over the global batch; CPU/gloo too). Parameters are
    kept, so an optimiser built before still holds them."""
    if not context.distributed:
        return model
    if sync_batch_norm:
        from .sync_batch_norm import convert_sync_batch_norm

        convert_sync_batch_norm(model)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
