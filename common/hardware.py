"""What the machine's processor can do, for choices that depend on it (precision)."""
from __future__ import annotations

import functools
from pathlib import Path

# /proc/cpuinfo flags of x86 processors that multiply bfloat16 natively: AVX-512 BF16 (AMD Zen 4 and
# later, Intel Cooper Lake) and AMX (Intel Sapphire Rapids and later).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions, where oneDNN runs bf16 matmuls and convolutions at about
    twice the fp32 rate; elsewhere bf16 is emulated and slower than fp32. Linux only (False elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)
