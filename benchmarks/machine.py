"""What kind of machine a benchmark ran on: the CPU model and the instruction sets that decide our speed (AMX and
AVX-512 bf16 make bf16 native; VNNI makes int8 products fast; AVX2-only CPUs emulate bf16)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def machine_kind() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    present = [flag for flag in FLAGS if flag in flags]
    kind = ("AMX" if "amx_bf16" in flags else "AVX-512 bf16" if "avx512_bf16" in flags
            else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other")
    return {"cpu": model, "kind": kind, "flags": present, "cpu_count": os.cpu_count()}


if __name__ == "__main__":
    print(machine_kind())
