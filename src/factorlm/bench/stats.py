"""Serving statistics with the metric names of vLLM's serving benchmark.

Pure functions over per-request timings so results compare directly with
``vllm bench serve`` output (``mean_ttft_ms``, ``p99_itl_ms``, ``request_goodput`` ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    """Timings of one streamed request, in seconds relative to its start.

    ``ttft`` is the time to the first token, ``itl`` the gaps between later tokens,
    ``latency`` the end-to-end time; ``success`` is False for failed requests.
    """

    prompt_len: int
    output_len: int
    ttft: float
    latency: float
    itl: list[float] = field(default_factory=list)
    success: bool = True


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``p`` in [0, 100]."""
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile p={p} is outside [0, 100]")
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _tpot(t: RequestTiming) -> float:
    """Time per output token after the first, vLLM's definition."""
    return (t.latency - t.ttft) / (t.output_len - 1) if t.output_len > 1 else 0.0


def _describe(prefix: str, seconds: list[float], pcts: tuple[float, ...]) -> dict[str, float]:
    ms = [s * 1000.0 for s in seconds]
    out = {
        f"mean_{prefix}_ms": sum(ms) / len(ms) if ms else 0.0,
        f"median_{prefix}_ms": percentile(ms, 50.0),
        f"std_{prefix}_ms": _std(ms),
    }
    for p in pcts:
        out[f"p{p:g}_{prefix}_ms"] = percentile(ms, p)
    return out


def _std(xs: list[float]) -> float:
    if not xs:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def summarize_requests(
    timings: list[RequestTiming],
    duration_s: float,
    *,
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0),
    slo_ms: dict[str, float] | None = None,
) -> dict[str, float | int]:
    """Aggregate request timings into vLLM serving-benchmark metrics.

    ``duration_s`` is the wall time of the whole run. ``slo_ms`` maps any of
    ``ttft``, ``tpot``, ``e2el`` to a limit in ms; requests meeting all limits count
    toward ``request_goodput`` (requests/s).
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    ok = [t for t in timings if t.success]
    out: dict[str, float | int] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(timings) - len(ok),
        "total_input_tokens": sum(t.prompt_len for t in ok),
        "total_output_tokens": sum(t.output_len for t in ok),
        "request_throughput": len(ok) / duration_s,
        "output_throughput": sum(t.output_len for t in ok) / duration_s,
        "total_token_throughput": sum(t.prompt_len + t.output_len for t in ok) / duration_s,
    }
    out.update(_describe("ttft", [t.ttft for t in ok], percentiles))
    out.update(_describe("tpot", [_tpot(t) for t in ok if t.output_len > 1], percentiles))
    out.update(_describe("itl", [x for t in ok for x in t.itl], percentiles))
    out.update(_describe("e2el", [t.latency for t in ok], percentiles))
    if slo_ms:
        unknown = set(slo_ms) - {"ttft", "tpot", "e2el"}
        if unknown:
            raise ValueError(f"unknown SLO metric(s) {sorted(unknown)}; use ttft, tpot, e2el")
        good = 0
        for t in ok:
            vals = {"ttft": t.ttft, "tpot": _tpot(t), "e2el": t.latency}
            if all(vals[k] * 1000.0 <= lim for k, lim in slo_ms.items()):
                good += 1
        out["request_goodput"] = good / duration_s
    return out
