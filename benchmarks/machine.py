"""What kind of machine a benchmark ran on: the CPU model and the instruction sets that decide our speed (AMX and
AVX-512 bf16 make bf16 native; VNNI makes int8 products fast; AVX2-only CPUs emulate bf16)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from mask2former.inference.runtimes import cpu_isa_flags


def cpu_model() -> str:
    """lscpu's "Model name" (/proc/cpuinfo's "model name" where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    for line in text.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_kind(flags: list[str]) -> str:
    if "amx_bf16" in flags:
        return "AMX (amx_bf16): native bf16 matrix units"
    if "avx512_bf16" in flags:
        return "AVX-512 with avx512_bf16: native bf16, no AMX"
    if any(flag.startswith("avx512") for flag in flags):
        return "AVX-512 without bf16" + (" (VNNI int8)" if "avx512_vnni" in flags else "")
    return "AVX2 only: no AVX-512, AMX or VNNI" if "avx_vnni" not in flags else "AVX2 + AVX-VNNI"


def machine_info() -> dict:
    """The keys benchmark JSONs record: ``cpu_model``, ``cpu_count``, ``cpu_flags`` and ``machine_kind``."""
    flags = cpu_isa_flags().split()
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "cpu_flags": flags,
            "machine_kind": machine_kind(flags)}


if __name__ == "__main__":
    print(machine_info())
