"""Resuming training: checkpoint files (atomic writes, finding the last one) and the RNG states that make it exact.

A checkpoint holds the model, optimiser, scheduler, GradScaler, the step, the samples consumed (the data order is a
function of (seed, epoch), see ``sampler.py``), the best metric, the non-finite counter and every RNG state (Python,
NumPy, torch CPU/CUDA, the point-sampling generator), per process. ``Trainer.fit(resume=True)`` on CPU therefore ends
bit-for-bit where an uninterrupted run ends.

Layout under ``output_dir``::

    checkpoints/checkpoint_0000500.pt   full training state (model, optimiser, scheduler, scaler, step, data, RNGs)
    checkpoints/last_checkpoint         the file name of the newest complete checkpoint
    model_best/, model_final/           weights for ``Mask2Former.from_pretrained`` (config.yaml + model.safetensors)

A file is written to a temporary name in the same directory, flushed and fsync'ed, then renamed over the target
(``os.replace`` is atomic on POSIX and Windows), and the directory is fsync'ed: a crash or SIGKILL at any moment
leaves either the old or the new file, never a torn one. Checkpoints hold only tensors and plain Python values, so
they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .sampler import derive_seed

CHECKPOINT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST_POINTER = "last_checkpoint"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)\.pt$")
TEMP_MARKER = ".tmp-"


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write_bytes(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda handle: handle.write(text.encode()))


def atomic_save_pretrained(model: torch.nn.Module, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
    """``model.save_pretrained`` into a temporary sibling directory, then swapped in place of ``directory``.
    (Directories cannot be renamed over non-empty ones; between the two renames only ``<name>.old-*`` exists.)"""
    directory = Path(directory)
    temp = directory.with_name(f".{directory.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(temp, extra)
    for file in temp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(directory, old)
    os.replace(temp, directory)
    _fsync_directory(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"checkpoint_{step:07d}.pt"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints in ``output_dir``, oldest first."""
    directory = Path(output_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_last_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint named by ``last_checkpoint``, else the highest-step ``checkpoint_*.pt``, else None."""
    directory = Path(output_dir) / CHECKPOINT_DIR
    pointer = directory / LAST_POINTER
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        if named.is_file():
            return named
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def save_training_checkpoint(state: dict[str, Any], output_dir: str | Path, step: int, keep: int = 2) -> Path:
    """Write ``state`` as ``checkpoint_<step>.pt``, point ``last_checkpoint`` at it, and delete all but the newest
    ``keep`` checkpoints (``keep <= 0`` keeps all)."""
    path = checkpoint_path(output_dir, step)
    atomic_torch_save(state, path)
    atomic_write_text(path.parent / LAST_POINTER, path.name + "\n")
    if keep > 0:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_training_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated or foreign file: name it
        raise ValueError(f"cannot read training checkpoint {path}: {str(error).splitlines()[0]}") from None


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Delete the temporary files a killed writer left behind (only our own naming pattern)."""
    for directory in (Path(output_dir), Path(output_dir) / CHECKPOINT_DIR):
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if path.name.startswith(".") and (TEMP_MARKER in path.name or ".old-" in path.name):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- RNG states


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def capture_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Python, NumPy, torch CPU, every CUDA device, and ``generator`` (e.g. the point-sampling one), as tensors
    and plain values (``weights_only``-loadable)."""
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generator": generator.get_state() if generator is not None else None,
    }


def restore_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])


def check_checkpoint(state: dict[str, Any], path: str | Path, model_config: dict[str, Any]) -> None:
    """Refuse a checkpoint of another format version or another model config (``to_dict(config.model)``)."""
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION}")
    saved_model = state.get("config", {}).get("model")
    if saved_model is not None and "weights" not in saved_model and not model_config.get("weights"):
        # checkpoints written before model.weights existed: an empty one is what they were trained with
        model_config = {key: value for key, value in model_config.items() if key != "weights"}
    if saved_model is not None and saved_model != model_config:
        changed = sorted(k for k in saved_model if saved_model[k] != model_config.get(k))
        raise ValueError(f"{path}: the checkpoint was trained with another model config (differs in {changed})")


def process_rng_state(state: dict[str, Any], path: str | Path, rank: int, world_size: int, seed: int
                      ) -> dict[str, Any] | int:
    """This process's saved RNG state; with another process count, a fresh seed (with a warning: the run is then
    not bit-identical to an uninterrupted one)."""
    rng = state.get("rng") or []
    if len(rng) == world_size:
        return rng[rank]
    warnings.warn(f"{path}: saved with {len(rng)} processes, resuming with {world_size}; random streams are "
                  f"re-seeded, so the run is not bit-identical to an uninterrupted one", RuntimeWarning, stacklevel=3)
    return derive_seed(seed, 2, int(state["step"]), rank)
