"""trim_host_heap hands freed heap back to the OS (the streamed compressor calls it after each block)."""

import sys

import pytest
import torch

from factorlm.compressor.host_memory import _malloc_trim, trim_host_heap


def _rss_anon() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("RssAnon"))


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="needs Linux glibc")
def test_trim_returns_the_freed_heap_that_malloc_keeps():
    trim_host_heap()  # free heap left by earlier tests would absorb the allocations below
    base = _rss_anon()
    chunks = [torch.ones(16384) for _ in range(2000)]  # 64 KB each: heap, below glibc's mmap threshold
    pinned = [torch.ones(16) for _ in range(100)]  # live allocations above the freed ones keep the heap top
    grown = _rss_anon() - base
    del chunks
    kept = _rss_anon() - base
    assert trim_host_heap() is True
    after = _rss_anon() - base
    assert grown > 100e6
    assert after < 0.25 * kept, (grown, kept, after)
    assert pinned[0].sum().item() == 16
