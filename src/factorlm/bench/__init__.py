"""Benchmark helpers: latency statistics and a memory-bandwidth probe."""

from factorlm.bench.bandwidth import measure_bandwidth
from factorlm.bench.stats import RequestTiming, percentile, summarize_requests

__all__ = ["RequestTiming", "measure_bandwidth", "percentile", "summarize_requests"]
