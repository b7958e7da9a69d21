"""Keep freed memory in the process for the next micrograph (glibc ``mallopt``).

A batch allocates the same large arrays for every micrograph: a 4096² image's FFT output alone
is 64 MiB. glibc serves every block above its mmap threshold (128 KiB to 32 MiB, adapting) with a
fresh ``mmap`` and gives it back to the kernel on ``free``, so the next micrograph's array is new
memory again, which the kernel must fault in and zero page by page: about 10 ms per 64 MiB here,
and 60–80 ms per 4096² micrograph over all its temporaries (measured in
``benchmarks/bench_speed.py``). :func:`keep_freed_memory` raises the mmap threshold and the trim
threshold, so large blocks come from the heap and stay there once freed; the next micrograph
reuses pages that are already mapped. The process's peak memory does not change (the same
arrays are alive at the peak); it only stops shrinking between micrographs.

Only a batch process calls this (``process_one`` does, on every backend); importing anisoctf as
a library changes nothing. Elsewhere than on glibc it does nothing.
"""

from __future__ import annotations

import sys

__all__ = ["keep_freed_memory"]

#: blocks up to this size come from the heap (a 8k × 8k float32 image is 256 MiB)
MMAP_THRESHOLD = 512 << 20
#: freed memory at the top of the heap is given back only beyond this much
TRIM_THRESHOLD = 768 << 20

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
_M_MMAP_THRESHOLD = -3

_DONE: list[bool] = []


def keep_freed_memory() -> bool:
    """Make glibc keep freed large blocks for reuse (once per process; later calls are free).

    Returns
    -------
    bool
        True when both thresholds were set (Linux with glibc), False otherwise.
    """
    if _DONE:
        return _DONE[0]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            mallopt = libc.mallopt  # absent on musl: AttributeError
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            )
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            ok = False
    _DONE.append(ok)
    return ok
