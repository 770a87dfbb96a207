"""The autocast context of a precision name (``fp32`` | ``bf16`` | ``fp16``), for training and inference alike, and
``auto``: bf16 where the device computes it natively, else fp32."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively on ``device``: a CUDA GPU with bf16 support, or a CPU for which
    oneDNN has bf16 kernels (AVX-512 or AMX). On an AVX2-only CPU bf16 is emulated and ~100x slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` with ``auto`` replaced by what ``device`` runs fast: bf16 where native, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def autocast(precision: str, device_type: str) -> AbstractContextManager:
    """No autocast for fp32; else ``torch.autocast`` to bfloat16 / float16 on ``device_type``."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


__all__ = ["PRECISIONS", "autocast", "native_bf16", "resolve_precision"]
