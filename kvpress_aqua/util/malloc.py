"""Make a CPU process's peak RSS follow its live tensors (glibc only).

glibc serves a request above its mmap threshold (128 KiB at start) with ``mmap`` and gives it back
to the kernel on ``free``. But each time such a block below 32 MiB is freed, glibc raises the
threshold to its size (the *dynamic* threshold), so later tensors up to that size come from the
heap, and the heap keeps the pages of freed ones. Peak RSS then depends on the order of
allocations, and differs between identical runs (``benchmarks/plan_rss.py``, ``docs/planner.md``).
:func:`pin_malloc_thresholds` fixes both thresholds, as the
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` environment variables do at start-up,
so freed tensors leave RSS at once and the planner's prediction holds for RSS as well.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["PINNED_THRESHOLD", "pin_malloc_thresholds"]

PINNED_THRESHOLD = 128 * 1024
"""Threshold pinned by default: glibc's initial mmap threshold."""
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def pin_malloc_thresholds(threshold: int = PINNED_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds at ``threshold`` bytes for the rest of the process.

    Blocks of ``threshold`` bytes or more are then always mapped on their own and unmapped when
    freed, and the heap is trimmed above ``threshold`` of free space. Call it before the model runs.

    Parameters
    ----------
    threshold : int
        Bytes; at most 32 MiB (glibc's limit for the mmap threshold).

    Returns
    -------
    bool
        ``True`` if glibc accepted both settings; ``False`` on a C library without ``mallopt``
        (macOS, musl), where nothing changes.

    """
    if not 0 < threshold <= 32 * 2**20:
        raise ValueError(f"threshold {threshold} bytes: give a value in 1..33554432 (32 MiB), e.g. 131072")
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
