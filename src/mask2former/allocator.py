"""Process-wide glibc malloc settings for CPU training and inference.

glibc serves allocations above a (dynamic) threshold with fresh ``mmap`` pages and returns them on free, so large
intermediate tensors can be page-faulted in again every step. Keeping allocations up to 32 MiB (glibc's cap for the
threshold) on the heap and not trimming it removes those faults. Measured on a 2-core VM: 0.80 -> 0.68 s per default
training step before the decoder's per-layer mask einsums were batched, ~2 % after (``benchmarks/default_step.py``
with and without ``--no-malloc-tuning``, interleaved). This is what ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` would do, but
those only work when set before the process starts. Set ``MASK2FORMER_MALLOC_TUNING=0`` to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # the largest value glibc accepts on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30

_applied: bool | None = None


def is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def tune_malloc() -> bool:
    """Apply the settings once per process; True when they are in effect (glibc Linux, not switched off)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MASK2FORMER_MALLOC_TUNING", "1") == "0" or not is_glibc():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # The mmap threshold goes first: setting either one switches glibc's dynamic threshold off, and a fixed
    # 128 KiB threshold (the default) would be slower than the dynamic one.
    _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    return _applied
