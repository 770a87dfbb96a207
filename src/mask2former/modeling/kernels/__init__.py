"""Optional run-time compiled kernels, chosen per call; importing this package never imports Triton.

MSDeformAttn's sampling core has three implementations with one contract (``ms_deform_attn_core``):

- ``"pytorch"``: the ``grid_sample`` path in ``ms_deform_attn.py`` (any device, the reference);
- ``"triton"``: ``triton_ms_deform_attn.ms_deform_attn_triton`` (CUDA; forward and backward kernels);
- ``"cpu"``: ``cpu_ms_deform_attn.ms_deform_attn_cpu`` (a C kernel built with the system compiler on first use).

``"auto"`` (the default) takes Triton for CUDA tensors when Triton imports and the GPU is new enough, the C kernel
for CPU tensors, and the PyTorch path everywhere else (ONNX export, tracing, torch.compile; under torch.compile the
CPU kernel's bf16 inference forward, a registered operator, is kept once the kernel has run eagerly). A kernel
that fails to build in "auto" mode is reported once with a warning and that device uses the PyTorch path. Force a
backend with the environment variable ``MASK2FORMER_MSDA_BACKEND=auto|triton|cpu|pytorch`` or in code with
``set_ms_deform_attn_backend`` / ``with ms_deform_attn_backend("pytorch"): ...`` (code wins over the environment).
Forcing ``"triton"`` or ``"cpu"`` raises where it cannot run instead of falling back; Triton on the CPU only runs
under ``TRITON_INTERPRET=1`` (slow, for tests).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor

__all__ = ["BACKENDS", "ENV_VAR", "ms_deform_attn_backend", "select_ms_deform_attn",
           "set_ms_deform_attn_backend", "triton_available"]

BACKENDS = ("auto", "triton", "cpu", "pytorch")
ENV_VAR = "MASK2FORMER_MSDA_BACKEND"

_backend_override: str | None = None
# Devices where a kernel failed to build in "auto" mode: they use the PyTorch path from then on.
_failed_devices: set[str] = set()
_verified_devices: set[str] = set()


def _check_backend(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown MSDeformAttn backend {name!r} (choose from {', '.join(BACKENDS)})")
    return name


def set_ms_deform_attn_backend(name: str | None) -> None:
    """Force ``"triton"``, ``"cpu"`` or ``"pytorch"``, or ``"auto"``; ``None`` goes back to the environment variable."""
    global _backend_override
    _backend_override = None if name is None else _check_backend(name, "set_ms_deform_attn_backend")


@contextlib.contextmanager
def ms_deform_attn_backend(name: str | None) -> Iterator[None]:
    """Use backend ``name`` inside the ``with`` block (restores the previous choice after it)."""
    global _backend_override
    previous = _backend_override
    set_ms_deform_attn_backend(name)
    try:
        yield
    finally:
        _backend_override = previous


def current_backend() -> str:
    if _backend_override is not None:
        return _backend_override
    return _check_backend(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", f"${ENV_VAR}")


@functools.lru_cache(maxsize=1)
def _import_triton_kernel() -> Callable | None:
    try:
        from .triton_ms_deform_attn import ms_deform_attn_triton
    except Exception:  # ImportError, or a Triton install that breaks while importing: treat as absent
        return None
    return ms_deform_attn_triton


def triton_available() -> bool:
    """Whether the Triton kernel module imports (says nothing about a GPU)."""
    return _import_triton_kernel() is not None


def _cpu_kernel(value: Tensor, *args) -> Tensor:
    from .cpu_ms_deform_attn import ms_deform_attn_cpu  # imported on first use: it compiles nothing until called

    return ms_deform_attn_cpu(value, *args)


def _auto_kernel(value: Tensor) -> Callable | None:
    """The kernel "auto" takes for ``value``, or None for the PyTorch path."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return None
    if str(value.device) in _failed_devices:
        return None
    if torch.compiler.is_compiling():
        # Of the kernels only the CPU bf16 inference forward is a registered operator that a compiled graph can hold.
        cpu_bf16 = value.device.type == "cpu" and value.dtype == torch.bfloat16 and not torch.is_grad_enabled()
        return _cpu_kernel if cpu_bf16 and str(value.device) in _verified_devices else None
    if value.device.type == "cpu":
        return _cpu_kernel
    if not value.is_cuda or torch.version.hip is not None:
        return None
    # Triton compiles for Volta (7.0) and newer.
    if torch.cuda.get_device_capability(value.device) >= (7, 0) and triton_available():
        return _import_triton_kernel()
    return None


def _guarded(kernel: Callable, fallback: Callable) -> Callable:
    """In "auto" mode the first call on a device may fail to compile (old driver, missing compiler): warn once,
    then use the PyTorch path on that device. Later failures are real errors and propagate."""

    def call(value: Tensor, *args):
        device = str(value.device)
        if device in _verified_devices:
            return kernel(value, *args)
        try:
            result = kernel(value, *args)
        except Exception as error:  # compile errors come in many types
            _failed_devices.add(device)
            warnings.warn(f"MSDeformAttn kernel failed on {device} ({type(error).__name__}: {error}); "
                          f"using the PyTorch path (set {ENV_VAR} to force the kernel and see the error)",
                          RuntimeWarning)
            return fallback(value, *args)
        _verified_devices.add(device)
        return result

    return call


def select_ms_deform_attn(value: Tensor, fallback: Callable) -> Callable:
    """The implementation of the MSDeformAttn core to use for ``value``; ``fallback`` is the PyTorch path."""
    backend = current_backend()
    if backend == "pytorch":
        return fallback
    if backend == "triton":
        kernel = _import_triton_kernel()
        if kernel is None:
            raise RuntimeError(f"{ENV_VAR}=triton but the Triton kernel cannot be imported (is triton installed?)")
        if not value.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(f"{ENV_VAR}=triton needs CUDA tensors (got {value.device}; or set TRITON_INTERPRET=1)")
        return kernel
    if backend == "cpu":
        if value.device.type != "cpu":
            raise RuntimeError(f"{ENV_VAR}=cpu needs CPU tensors (got {value.device})")
        return _cpu_kernel
    kernel = _auto_kernel(value)
    return fallback if kernel is None else _guarded(kernel, fallback)
