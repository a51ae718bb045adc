"""Giving freed host memory back to the operating system between decoder blocks.

glibc's malloc keeps the heap a finished block freed (its fp32 weights, the factorization's
temporaries) for reuse instead of returning it, and the next block's allocations do not always
fit the holes, so the resident size of a streamed compression grows with depth although no
tensor is kept (measured on the Llama-3.2-1B shape: about +95 MB per block,
benchmarks/results/scale.md). ``malloc_trim(0)`` after each block hands the free pages back.
Elsewhere than Linux/glibc this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim`` as a ctypes function, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim_host_heap() -> bool:
    """Collect garbage, then return free heap pages to the OS; True when malloc_trim ran."""
    gc.collect()
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
