"""Prometheus metrics of the server (names mirror vLLM's under the ``factorlm:`` prefix).

Each app gets its own registry so that several servers (tests) can live in one process.
Request counts and errors are recorded per route and status code by the outermost ASGI
layer (:mod:`factorlm.serving.middleware`), which every response passes, 500s included;
latencies and tokens by the request handlers; queue depth is read from the engine at
scrape time.
"""

from __future__ import annotations

import resource
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """All metric objects of one server."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("factorlm:http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.errors = Counter("factorlm:request_errors", "HTTP responses with status >= 400 by route, status and type",
                              ["route", "status", "type"], registry=r)
        self.success = Counter("factorlm:request_success", "Finished generations by finish reason",
                               ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("factorlm:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("factorlm:generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("factorlm:time_to_first_token_seconds", "Time from request arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("factorlm:inter_token_latency_seconds", "Time between successive token events",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("factorlm:e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.running = Gauge("factorlm:num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("factorlm:num_requests_waiting", "Requests in the waiting queue (queue depth)",
                             registry=r)
        self.max_rss = Gauge("factorlm:process_max_rss_bytes", "Peak resident set size of the server process",
                             registry=r)

    def record_error(self, route: str, status: int, error_type: str) -> None:
        self.errors.labels(route=route, status=str(status), type=error_type).inc()

    def observe_token(self, started: float, last: float) -> float:
        """Record the time since ``last`` (TTFT when ``last == started``, else inter-token latency); the new ``last``."""
        now = time.perf_counter()
        (self.ttft if last == started else self.itl).observe(now - last)
        return now

    def record_finish(self, finish_reason: str | None, completion_tokens: int, started: float) -> None:
        """A finished generation: end-to-end latency, reason and tokens."""
        self.e2e.observe(time.perf_counter() - started)
        self.success.labels(finished_reason=finish_reason or "unknown").inc()
        self.generation_tokens.inc(completion_tokens)

    def render(self) -> bytes:
        """The text exposition format, with gauges refreshed from the engine."""
        stats = self.engine.stats()
        self.running.set(stats.get("running", 0))
        self.waiting.set(stats.get("waiting", 0))
        self.max_rss.set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return generate_latest(self.registry)
