"""MSDeformAttn sampling core as a small C kernel for the CPU (forward and backward), compiled at run time.

Same contract as ``ms_deform_attn_core``: value [B, S, heads, D], sampling_locations [B, Lq, heads, L, P, 2] in
[0, 1] as (x, y), attention_weights [B, Lq, heads, L, P] -> [B, Lq, heads*D], bilinear with ``align_corners=False``
and zero padding. It computes in fp32 (fp64 if any input is fp64); other dtypes are cast, as the ``grid_sample``
path casts them. One exception, for inference: a bfloat16 ``value`` with nothing requiring a gradient (bf16 autocast
with the pixel decoder in bf16) is read as bfloat16 by a forward-only variant that sums each output row in fp32 and
returns it rounded to bfloat16 (which the output projection casts it to under autocast anyway). It saves the cast
of ``value`` and half of the gather's memory traffic, but the gather is latency- rather than bandwidth-bound: on
Swin-T at 512^2 it is no faster end to end than the fp32 kernel (benchmarks/forward_vs_transformers.py). Being a
registered operator, it is what lets a torch.compile'd bf16 graph keep the C kernel instead of grid_sample.

Why: the ``grid_sample`` path materialises every sample ([B*heads, D, P*Lq] per level) and weights it in separate
passes, forward and backward; on the CPU those passes are memory-bound and took most of the pixel decoder's time.
The kernel (``ms_deform_attn_cpu.c``) gathers each sample's four corners straight into the output row.

The source is compiled with the system C compiler (``$CC`` if set, else ``cc``/``gcc``/``clang``) into a shared library
cached under ``$MASK2FORMER_CACHE_DIR`` (default ``~/.cache/mask2former``), keyed by the source, the compiler, the
flags and the CPU (it is built with ``-march=native``); it needs no PyTorch headers and compiles in about a second.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .common import check_core_inputs

__all__ = ["CompileError", "cache_dir", "load_library", "ms_deform_attn_cpu"]

SOURCE = Path(__file__).with_name("ms_deform_attn_cpu.c")
_SCALARS = {torch.float32: "float", torch.float64: "double"}
# What each library variant is compiled with ("bfloat16": bf16 value and output, fp32 sums; forward only).
_DEFINES = {"float": ["-DSCALAR=float"], "double": ["-DSCALAR=double"],
            "bfloat16": ["-DSCALAR=float", "-DVALUE_BF16"]}
# Tried in order: the first set the compiler accepts is used (without OpenMP, e.g. Apple's clang, the kernel runs on
# one thread; without -march=native, with the compiler's baseline vector instructions).
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])


# Whether a bfloat16 value without gradients takes the bf16 forward (benchmarks switch it off to compare).
BF16_FORWARD = True


class CompileError(RuntimeError):
    """The C kernel could not be built (no compiler, or the compiler failed)."""


def cache_dir() -> Path:
    if os.environ.get("MASK2FORMER_CACHE_DIR"):
        return Path(os.environ["MASK2FORMER_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mask2former"


def _compiler() -> str:
    """``$CC`` when set (and then only it), else the first of cc, gcc, clang on the PATH."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for candidate in candidates:
        if shutil.which(candidate):
            return shutil.which(candidate)
    raise CompileError(f"no C compiler found (tried {', '.join(candidates)}; set $CC, or install gcc or clang)")


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags where Linux tells them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return platform.machine() + "".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


@functools.lru_cache(maxsize=None)
def load_library(scalar: str) -> ctypes.CDLL:
    """The kernel for ``scalar`` ("float", "double" or "bfloat16"), compiled on first use and cached on disk."""
    compiler = _compiler()
    source = SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        command = [compiler, *flags, "-shared", "-fPIC", *_DEFINES[scalar]]
        key = hashlib.sha256(b"\0".join([source, " ".join(command).encode(), _cpu_signature().encode()]))
        target = cache_dir() / f"ms_deform_attn_cpu_{scalar}_{key.hexdigest()[:16]}.so"
        if not target.exists():
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError:  # a read-only home: build in a private temporary directory instead
                target = Path(tempfile.mkdtemp(prefix="mask2former-")) / target.name
            # Compile to a private name, then rename: concurrent processes (DDP ranks) never see a partial file.
            handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(handle)
            result = subprocess.run([*command, "-o", partial, str(SOURCE), "-lm"], capture_output=True, text=True)
            if result.returncode != 0:
                os.unlink(partial)
                messages = [line for line in result.stderr.splitlines() if "error" in line.lower()]
                errors.append(f"{' '.join(command)}: {messages[0] if messages else f'exit {result.returncode}'}")
                continue
            os.replace(partial, target)
        library = ctypes.CDLL(str(target))
        pointer, index = ctypes.c_void_p, ctypes.c_int64
        library.msda_forward.argtypes = [pointer] * 5 + [index] * 7 + [ctypes.c_int]
        library.msda_forward.restype = None
        if scalar != "bfloat16":
            library.msda_backward.argtypes = [pointer] * 8 + [index] * 7 + [ctypes.c_int]
            library.msda_backward.restype = None
        return library
    raise CompileError(f"could not compile {SOURCE.name}: {'; '.join(errors)}")


def _level_table(spatial_shapes) -> Tensor:
    """[L, 3] int64 (height, width, first token)."""
    rows, start = [], 0
    for height, width in spatial_shapes:
        rows.append((int(height), int(width), start))
        start += int(height) * int(width)
    return torch.tensor(rows, dtype=torch.int64)


def _check_inputs(value: Tensor, spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor) -> None:
    check_core_inputs("ms_deform_attn_cpu", value, spatial_shapes, sampling_locations, attention_weights)
    for name, tensor in (("value", value), ("sampling_locations", sampling_locations),
                         ("attention_weights", attention_weights)):
        if tensor.device.type != "cpu":
            raise ValueError(f"ms_deform_attn_cpu: {name} is on {tensor.device}, not the CPU")
        if not tensor.is_floating_point():
            raise ValueError(f"ms_deform_attn_cpu: {name} dtype {tensor.dtype} is not floating point")


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, levels: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
        batch, tokens, heads, head_dim = value.shape
        _, queries, _, num_levels, points, _ = sampling_locations.shape
        library = load_library(_SCALARS[value.dtype])
        output = torch.empty(batch, queries, heads, head_dim, dtype=value.dtype)
        value = value.transpose(1, 2).contiguous()
        with torch.profiler.record_function("mask2former::msda_forward"):  # named in profiles
            library.msda_forward(value.data_ptr(), levels.data_ptr(), sampling_locations.data_ptr(),
                                 attention_weights.data_ptr(), output.data_ptr(), batch, tokens, queries, heads,
                                 head_dim, num_levels, points, torch.get_num_threads())
        ctx.save_for_backward(value, levels, sampling_locations, attention_weights)
        return output.view(batch, queries, heads * head_dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        value, levels, sampling_locations, attention_weights = ctx.saved_tensors
        batch, heads, tokens, head_dim = value.shape  # saved head-major
        _, queries, _, num_levels, points, _ = sampling_locations.shape
        grad_output = grad_output.to(value.dtype).contiguous()
        grad_value = torch.zeros_like(value)
        grad_locations = torch.empty_like(sampling_locations)
        grad_weights = torch.empty_like(attention_weights)
        load_library(_SCALARS[value.dtype]).msda_backward(
            value.data_ptr(), levels.data_ptr(), sampling_locations.data_ptr(), attention_weights.data_ptr(),
            grad_output.data_ptr(), grad_value.data_ptr(), grad_locations.data_ptr(), grad_weights.data_ptr(),
            batch, tokens, queries, heads, head_dim, num_levels, points, torch.get_num_threads())
        return grad_value.transpose(1, 2), None, grad_locations, grad_weights


def ms_deform_attn_cpu(value: Tensor, spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The C kernel on CPU tensors; the inputs are cast to one compute dtype here so autograd casts the gradients
    back to each input's own dtype."""
    _check_inputs(value, spatial_shapes, sampling_locations, attention_weights)
    inputs = (value, sampling_locations, attention_weights)
    if (BF16_FORWARD and value.dtype == torch.bfloat16 and all(t.dtype != torch.float64 for t in inputs)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))):
        return _forward_bf16(value, spatial_shapes, sampling_locations, attention_weights)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32
    value, sampling_locations, attention_weights = (t.to(dtype).contiguous() for t in inputs)
    return _MSDeformAttnFunction.apply(value, _level_table(spatial_shapes), sampling_locations, attention_weights)


def _forward_bf16(value: Tensor, spatial_shapes, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Inference forward with a bfloat16 ``value``: fp32 locations and weights, fp32 sums, bfloat16 output."""
    sampling_locations, attention_weights = (t.float().contiguous() for t in (sampling_locations, attention_weights))
    return msda_forward_bf16(value.contiguous(), _level_table(spatial_shapes), sampling_locations, attention_weights)


# A registered operator, so that it is named in profiles and torch.compile can keep it in a graph as one opaque call.
@torch.library.custom_op("mask2former::msda_forward_bf16", mutates_args=(), device_types="cpu")
def msda_forward_bf16(value: Tensor, levels: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """The bf16 C forward: value [B, S, heads, D] bf16, levels [L, 3] int64, fp32 locations and weights (contiguous)
    -> [B, Lq, heads*D] bf16."""
    batch, tokens, heads, head_dim = value.shape
    _, queries, _, num_levels, points, _ = sampling_locations.shape
    output = torch.empty(batch, queries, heads, head_dim, dtype=torch.bfloat16)
    value = value.transpose(1, 2).contiguous()  # the kernel reads head-major [B, heads, S, D]
    with torch.profiler.record_function("mask2former::msda_forward_bf16"):  # eager custom ops are not recorded
        load_library("bfloat16").msda_forward(
            value.data_ptr(), levels.data_ptr(), sampling_locations.data_ptr(), attention_weights.data_ptr(),
            output.data_ptr(), batch, tokens, queries, heads, head_dim, num_levels, points, torch.get_num_threads())
    return output.view(batch, queries, heads * head_dim)


@msda_forward_bf16.register_fake
def _(value: Tensor, levels: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    batch, _, heads, head_dim = value.shape
    return value.new_empty(batch, sampling_locations.shape[1], heads * head_dim)
