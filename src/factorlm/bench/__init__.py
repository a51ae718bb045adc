"""Benchmark helpers: latency statistics, a memory-bandwidth probe, and the offline engine harness."""

from factorlm.bench.bandwidth import measure_bandwidth
from factorlm.bench.offline import format_markdown, run_offline
from factorlm.bench.runner import BenchConfig, EngineSpec, EngineUnavailable, RunTiming, register_engine
from factorlm.bench.stats import RequestTiming, percentile, summarize_requests

__all__ = ["BenchConfig", "EngineSpec", "EngineUnavailable", "RequestTiming", "RunTiming", "format_markdown",
           "measure_bandwidth", "percentile", "register_engine", "run_offline", "summarize_requests"]
