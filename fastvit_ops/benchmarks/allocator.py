"""The C heap's state, which every CPU timing of ``bench`` depends on.

With glibc's defaults a buffer above the mmap threshold (128 KiB, raised only as mmapped chunks
are freed) or freed at the top of a heap that has grown past the trim threshold goes back to the
OS, and the next allocation of that size faults its pages in again. Which of the two happens
depends on what the process did before: on the 2-core Zen 4 CI machine a 1×1 convolution
(8, 32, 56, 56) 32→128 took 8.9 ms in one state and 1.1 ms in the other, and the reference
FAT-B0's eager throughput moved 39 ↔ 64 img/s between runs of the same command. Fused ops that
allocate less gain most from the slow state, so ratios measured in it flatter them.

:func:`steady_heap` pins glibc to the state a long-running process settles in (buffers up to
32 MiB from the heap, nothing trimmed), so that every column of a run, and every run, is timed
alike. ``python -m fastvit_ops bench`` does this by default (``--malloc glibc`` leaves the
defaults) and records the state in its JSON (``env.malloc``). Allocators preloaded instead of
glibc's (jemalloc, tcmalloc) are left alone: the call then changes nothing they use.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

#: glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2): larger buffers are always
#: mmapped.
MMAP_THRESHOLD = 32 << 20
#: Never trim the heap's top (mallopt takes an int).
TRIM_THRESHOLD = 2 ** 31 - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

_state = "glibc defaults" if platform.libc_ver()[0] == "glibc" else "the platform's allocator"


def steady_heap() -> str:
    """Set glibc's mmap threshold to 32 MiB and its trim threshold to 2 GiB (disabling both dynamic
    adjustments) for the rest of the process; returns :func:`state`. A no-op where the C library
    is not glibc or ``mallopt`` refuses."""
    global _state
    if platform.libc_ver()[0] != "glibc":
        return _state
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    except (OSError, AttributeError):
        return _state
    if ok:
        _state = f"glibc steady: mmap threshold {MMAP_THRESHOLD >> 20} MiB, no trimming"
    return _state


def state() -> str:
    """What this process's allocator does with large buffers, as :func:`steady_heap` left it."""
    return _state


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "state", "steady_heap"]
