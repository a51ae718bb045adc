"""Statistics of the benchmark harness on synthetic timings."""

import pytest
import torch

from factorlm.bench import RequestTiming, measure_bandwidth, percentile, summarize_requests


def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 100) == 5.0
    assert percentile(xs, 90) == pytest.approx(4.6)
    assert percentile([], 50) == 0.0
    with pytest.raises(ValueError, match="outside"):
        percentile(xs, 101)


def test_summary_throughput_latency_and_goodput():
    timings = [
        RequestTiming(prompt_len=10, output_len=5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
        RequestTiming(prompt_len=20, output_len=3, ttft=0.3, latency=0.7, itl=[0.2, 0.2]),
        RequestTiming(prompt_len=7, output_len=0, ttft=0.0, latency=0.1, success=False),
    ]
    s = summarize_requests(timings, duration_s=2.0, slo_ms={"ttft": 200.0})
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["total_output_tokens"] == 8
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(4.0)
    assert s["total_token_throughput"] == pytest.approx(19.0)
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["median_tpot_ms"] == pytest.approx(150.0)  # tpots 100 ms and 200 ms
    assert s["p99_itl_ms"] == pytest.approx(200.0)
    assert s["mean_e2el_ms"] == pytest.approx(600.0)
    assert s["request_goodput"] == pytest.approx(0.5)  # only the first meets ttft <= 200 ms
    with pytest.raises(ValueError, match="unknown SLO"):
        summarize_requests(timings, 1.0, slo_ms={"foo": 1.0})


def test_bandwidth_probe_returns_positive_rate():
    torch.set_num_threads(1)
    r = measure_bandwidth(size_mib=8, repeats=3)
    assert r["bandwidth_gbps_median"] > 0
    assert r["probe_bytes"] == 8 * 1024 * 1024
