"""The autocast context of a precision name (``fp32`` | ``bf16`` | ``fp16``), for training and inference alike."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast(precision: str, device_type: str) -> AbstractContextManager:
    """No autocast for fp32; else ``torch.autocast`` to bfloat16 / float16 on ``device_type``."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


__all__ = ["PRECISIONS", "autocast"]
