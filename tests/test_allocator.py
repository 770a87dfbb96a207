import subprocess
import sys

import pytest

from mask2former import allocator

# Allocates a 16 MiB tensor and reports how many more bytes glibc serves from mmap (mallinfo2().hblkhd) while it lives.
PROBE = """
import ctypes, sys
from mask2former.allocator import tune_malloc
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = tune_malloc()
import torch
before = libc.mallinfo2().hblkhd
block = torch.empty(4 << 20, dtype=torch.float32).fill_(1.0)
print(int(applied), libc.mallinfo2().hblkhd - before)
"""


def probe(env_value: str) -> tuple[bool, int]:
    env = {"MASK2FORMER_MALLOC_TUNING": env_value, "PATH": ""}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    applied, mmapped = out.stdout.split()
    return applied == "1", int(mmapped)


@pytest.mark.skipif(not allocator.is_glibc(), reason="mallopt is glibc's")
def test_large_tensors_stay_on_the_heap():
    """With the tuning a 16 MiB tensor comes from the heap (nothing mmapped); without it glibc mmaps it."""
    applied, mmapped = probe("1")
    assert applied and mmapped == 0
    applied, mmapped = probe("0")
    assert not applied and mmapped >= (16 << 20)
