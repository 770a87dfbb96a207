"""Reading foreign checkpoint files without running code from them.

A detectron2 ``model_final_*.pkl`` is a plain pickle of ``{"model": {name: numpy array}, "__author__": ...}``.
``pickle.load`` would call any global the file names (``os.system``...), so ``RestrictedUnpickler`` resolves only
the few globals that numpy arrays and plain containers need and refuses everything else. Torch files (zip, or
the legacy pickle format) go through ``torch.load(weights_only=True)``, torch's own restricted unpickler.

Torch tensors can also sit in a plain pickle: Mask2Former's ``tools/convert-pretrained-swin-model-to-d2.py``
writes the Swin release's tensors as they are with ``pickle.dump``. A tensor pickles as
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` and its storage as
``torch.storage._load_from_bytes(b)`` where ``b`` is a legacy ``torch.save`` of the storage. torch's
``_load_from_bytes`` is ``torch.load(b, weights_only=False)``: whatever ``b`` holds would run. So those two names (and ``_rebuild_parameter``) resolve to
our own functions: the bytes go through ``torch.load(weights_only=True)`` and must give a storage, the rebuild
arguments are checked (no hooks, ints for the geometry) before torch's rebuild runs.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import io
import pickle
import warnings
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
    """The file asks for something other than arrays, tensors and plain containers."""


# The names a plain pickle of CPU/GPU dense tensors uses (torch 1.x and 2.x alike), answered by our checked
# versions (methods of RestrictedUnpickler, so that errors name the file).
_TORCH_GLOBALS = {
    ("torch.storage", "_load_from_bytes"): "_storage_from_bytes",
    ("torch._utils", "_rebuild_tensor_v2"): "_rebuild_tensor",
    ("torch._utils", "_rebuild_parameter"): "_rebuild_parameter",
}
_REFUSAL = "only numpy arrays, torch tensors and plain containers are allowed"


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ``ALLOWED_GLOBALS`` and the checked torch tensor rebuilds (``_TORCH_GLOBALS``);
    ``source`` names the file in errors."""

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
        if (module, name) in _TORCH_GLOBALS:
            return getattr(self, _TORCH_GLOBALS[(module, name)])
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafeCheckpointError(f"{self.source}: refusing to unpickle {module}.{name} ({_REFUSAL})")
        return allowed

    # ----- torch tensors in a plain pickle ---------------------------------------------------------------
    def _storage_from_bytes(self, data: Any) -> torch.TypedStorage:
        """What ``torch.storage._load_from_bytes`` would give, read with ``weights_only=True``: the embedded bytes
        may only hold a storage (any other object, or a global torch does not allow, is refused unexecuted)."""
        if not isinstance(data, (bytes, bytearray)):
            raise UnsafeCheckpointError(f"{self.source}: a tensor storage is built from a {type(data).__name__}, "
                                        "not from bytes")
        try:
            with warnings.catch_warnings():  # TypedStorage's deprecation notice, once per tensor
                warnings.simplefilter("ignore")
                storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
        except Exception as error:  # torch's weights-only refusal, or a corrupt payload
            raise UnsafeCheckpointError(
                f"{self.source}: the bytes of a tensor storage were refused by torch.load(weights_only=True) "
                f"({_torch_reason(error)})"
            ) from None
        if not isinstance(storage, torch.TypedStorage):
            raise UnsafeCheckpointError(f"{self.source}: the bytes of a tensor storage hold a "
                                        f"{type(storage).__name__}, not a storage")
        return storage

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                        hooks: Any = None, metadata: Any = None) -> torch.Tensor:
        """``torch._utils._rebuild_tensor_v2`` after checking its arguments: a storage from
        ``_storage_from_bytes``, int geometry, no backward hooks. The tensor comes back without ``requires_grad``
        (weights are data here)."""
        if not isinstance(storage, torch.TypedStorage):
            raise UnsafeCheckpointError(f"{self.source}: a tensor is rebuilt from a {type(storage).__name__}, "
                                        "not from a storage")
        if not (_is_int(offset) and _is_int_tuple(size, stride)):
            raise UnsafeCheckpointError(f"{self.source}: a tensor with a malformed size/stride/offset "
                                        f"({size!r}, {stride!r}, {offset!r})")
        if hooks or metadata:  # hooks are callables; metadata (conj/neg bits) never appears in a weights file
            raise UnsafeCheckpointError(f"{self.source}: a tensor with backward hooks or metadata")
        if offset < 0 or len(size) != len(stride) or any(v < 0 for v in (*size, *stride)):
            raise CheckpointError(f"{self.source}: a tensor with negative or mismatched geometry (size {size!r}, "
                                  f"stride {stride!r}, offset {offset})")
        # torch's set_ grows a storage that is too small instead of failing: check the extent here.
        extent = 0 if 0 in size else offset + 1 + sum((n - 1) * step for n, step in zip(size, stride))
        if extent > storage._size():
            raise CheckpointError(f"{self.source}: a tensor of size {tuple(size)} (stride {tuple(stride)}, offset "
                                  f"{offset}) reaches element {extent - 1} of a storage of {storage._size()}")
        return torch._utils._rebuild_tensor_v2(storage, offset, tuple(size), tuple(stride), False,
                                               collections.OrderedDict())

    def _rebuild_parameter(self, data: Any, requires_grad: Any = False, hooks: Any = None) -> torch.Tensor:
        """``torch.nn.Parameter`` as pickled (``_rebuild_parameter``): its tensor, without hooks."""
        if not isinstance(data, torch.Tensor) or hooks:
            raise UnsafeCheckpointError(f"{self.source}: a parameter of a {type(data).__name__} or with hooks")
        return data

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(
            f"{self.source}: refusing a pickle persistent id (external objects are not allowed in a plain pickle)"
        )


def load_pickle(path: str | Path) -> Any:
    """The first object of the pickle file ``path``, refusing any global outside ``ALLOWED_GLOBALS`` and the checked
    tensor rebuilds."""
    with open(path, "rb") as file:
        return _load_restricted(file, str(path))


def load_untrusted(path: str | Path) -> Any:
    """Load a checkpoint file of unknown origin: a plain pickle (detectron2 ``.pkl``, numpy arrays or torch tensors)
    through ``RestrictedUnpickler``, a torch file (``.pth``: zip or legacy format) through ``torch.load(weights_only=True)``."""
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
    except CheckpointError:  # ours (unsafe, or a tensor that does not fit its storage), already one line
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise CheckpointError(f"{source}: not a readable pickle file ({type(error).__name__}: {error})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_tuple(*values: Any) -> bool:
    return all(isinstance(value, (tuple, list)) and all(_is_int(v) for v in value) for value in values)


def _torch_reason(error: Exception) -> str:
    """The informative line of torch's weights-only error (it starts with a generic preamble)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "magic number" in line:
            return line
    return lines[-1] if lines else type(error).__name__
