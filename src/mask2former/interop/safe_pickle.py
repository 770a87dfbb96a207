"""Reading foreign checkpoint files without running code from them.

A detectron2 ``model_final_*.pkl`` is a plain pickle of ``{"model": {name: numpy array}, "__author__": ...}``.
``pickle.load`` would call any global the file names (``os.system``...), so ``RestrictedUnpickler`` resolves only
the few globals that numpy arrays and plain containers need and refuses everything else. Torch files (zip, or
the legacy pickle format) go through ``torch.load(weights_only=True)``, torch's own restricted unpickler.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

try:  # numpy >= 2 pickles name numpy._core; files written by numpy 1.x name numpy.core
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

# What a pickled ndarray / numpy scalar / dtype / OrderedDict refers to. Nothing here can run code or touch the
# file system: array reconstruction, dtype construction, containers, and bytes decoding for protocol-2 files.
_NUMPY_GLOBALS: dict[str, Any] = {
    "_reconstruct": _multiarray._reconstruct,
    "scalar": _multiarray.scalar,
}
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): codecs.encode,  # how protocols 0-2 store bytes under Python 3
}
for _core in ("numpy.core", "numpy._core"):
    for _name, _value in _NUMPY_GLOBALS.items():
        ALLOWED_GLOBALS[(f"{_core}.multiarray", _name)] = _value
    ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _numeric._frombuffer  # protocol 5 arrays

# The first object of a legacy (non-zip) ``torch.save`` file.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class UnsafeCheckpointError(CheckpointError):
    """The file asks for something other than arrays and plain containers."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ``ALLOWED_GLOBALS``; ``source`` names the file in errors."""

    def __init__(self, file, source: str = "<pickle>", encoding: str = "latin1") -> None:
        # latin1: detectron2's own reader uses it, so Python-2 era files with numpy payloads decode.
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (``__builtin__``, ``copy_reg``...) as Python 3 spells them.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafeCheckpointError(
                f"{self.source}: refusing to unpickle {module}.{name} "
                "(only numpy arrays and plain containers are allowed)"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(
            f"{self.source}: refusing a pickle persistent id (torch storages and other external objects are not "
            "allowed in a plain pickle)"
        )


def load_pickle(path: str | Path) -> Any:
    """The first object of the pickle file ``path``, refusing any global outside ``ALLOWED_GLOBALS``."""
    with open(path, "rb") as file:
        return _load_restricted(file, str(path))


def load_untrusted(path: str | Path) -> Any:
    """Load a checkpoint file of unknown origin: a plain pickle (detectron2 ``.pkl``) through
    ``RestrictedUnpickler``, a torch file (``.pth``: zip or legacy format) through ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if zipfile.is_zipfile(path):
        return load_torch(path)
    with open(path, "rb") as file:
        first = _load_restricted(file, str(path))
    if isinstance(first, int) and first == _TORCH_LEGACY_MAGIC:
        return load_torch(path)
    return first


def load_torch(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with a one-line error when torch refuses the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ... with multi-paragraph messages
        raise UnsafeCheckpointError(
            f"{path}: torch.load(weights_only=True) refused the file ({_torch_reason(error)}); only tensors and "
            "plain containers are loaded"
        ) from None


def _load_restricted(file, source: str) -> Any:
    try:
        return RestrictedUnpickler(file, source).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise CheckpointError(f"{source}: not a readable pickle file ({type(error).__name__}: {error})") from None


def _torch_reason(error: Exception) -> str:
    """The informative line of torch's weights-only error (it starts with a generic preamble)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "magic number" in line:
            return line
    return lines[-1] if lines else type(error).__name__
