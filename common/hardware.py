"""What the machine's processor can do, for choices that depend on it (precision)."""
from __future__ import annotations

import functools
from pathlib import Path

# /proc/cpuinfo flags of x86 processors that multiply bfloat16 natively, fastest first: AMX (Intel Sapphire
# Rapids and later) and AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake). Without them oneDNN emulates
# bf16, slower than fp32.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpuinfo_flags() -> set[str]:
    """The flags line of /proc/cpuinfo (empty where there is none: not Linux, or not x86)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


@functools.cache
def cpu_bf16_feature() -> str | None:
    """The CPU's native bf16 feature ('amx_bf16' or 'avx512_bf16'), or None. (torch's
    `get_cpu_capability()` names only the vector width, 'AVX512', not bf16 support.)"""
    flags = cpuinfo_flags()
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions, where oneDNN runs bf16 matmuls and convolutions at about
    twice the fp32 rate."""
    return cpu_bf16_feature() is not None
