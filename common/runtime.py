"""Process-wide CPU settings that every entry point gets by importing :mod:`common`.

glibc's malloc hands each freed block above its mmap threshold back to the kernel, and trims the heap top
above 128 KiB; PyTorch's CPU activations are such blocks, so every layer of every forward touched fresh pages
again. On 2 cores that was 267 million page faults and 747 s of kernel time in one ``make demo``
(``/usr/bin/time -v``), and the SA-2 window encoder ran 1.8x slower than with the memory kept
(``benchmarks/malloc_tuning.py``). :func:`keep_freed_memory` keeps it: blocks up to 32 MiB come from the heap,
and the heap is trimmed only past 1 GiB free. It changes where tensors live, never what is computed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameters
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value (half its 64 MiB arena heap)
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20

OPT_OUT = "LUNGSEG_MALLOC_TUNING"  # "0": leave glibc's defaults (benchmarks/malloc_tuning.py's baseline)


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds so freed tensor memory is reused instead of returned to the kernel.

    Does nothing (and returns False) off Linux/glibc, when ``LUNGSEG_MALLOC_TUNING=0``, or when the user set malloc
    tunables of their own in ``GLIBC_TUNABLES``. Processes forked later (DataLoader workers) inherit the setting.
    """
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT, "1") == "0":
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: no mallopt
        return False
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )


__all__ = ["OPT_OUT", "keep_freed_memory"]
