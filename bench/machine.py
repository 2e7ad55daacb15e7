"""Where a bench ran: this machine's CPU model, core count and SIMD flags, printed at the top of every bench.

The build machines differ between sessions (AVX2-only EPYCs, AVX-512 VNNI EPYCs and Xeons): a ratio only means
something next to the CPU it was measured on.
"""
from __future__ import annotations

import os
from pathlib import Path

# /proc/cpuinfo flags that decide which integer and float kernels a CPU runs
SIMD_FLAG_PARTS = ("avx", "vnni", "fma", "amx", "neon", "asimd", "dotprod", "i8mm", "sve")


def cpu_model_and_flags(cpuinfo: str | None = None) -> tuple[str, list[str]]:
    """(model name, SIMD flags) from ``/proc/cpuinfo`` text (read when not given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = "unknown", []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model == "unknown":
            model = value.strip()
        if key in ("flags", "features") and not flags:
            flags = [f for f in value.split() if any(part in f for part in SIMD_FLAG_PARTS)]
    return model, flags


def machine_lines() -> list[str]:
    model, flags = cpu_model_and_flags()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [f"cpu: {model} ({cores} cores available)",
            f"isa flags: {' '.join(flags) or 'none of ' + '/'.join(SIMD_FLAG_PARTS)}"]


def print_machine() -> None:
    print("\n".join(machine_lines()), flush=True)
