"""benchmarks/plots.py: data extraction and drawing from result files (skips absent inputs)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
_SPEC = importlib.util.spec_from_file_location("bench_plots", Path(__file__).parents[2] / "benchmarks" / "plots.py")
plots = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(plots)


def _sweep() -> dict:
    def run(keep, speedup, ratio):
        return {"keep": keep, "ratios": [{"engine": "torch", "batch": 1, "decode_speedup": speedup, "bytes_ratio": ratio}]}

    return {"bench": "offline-sweep", "runs": [run(0.7, 1.1, 1.3), run(0.3, 1.8, 2.5)]}


def test_sweep_and_quality_points():
    assert plots.sweep_points(_sweep(), "torch") == {1: [(0.3, 1.8, 2.5), (0.7, 1.1, 1.3)]}
    quality = {"q": {"rows": [{"method": "dense", "wikitext2_ppl": 24.0},
                              {"method": "svd", "keep_linear": 0.9, "linear_kept_actual": 0.89, "wikitext2_ppl": 99.0},
                              {"method": "svd", "keep_linear": 0.5}]}}
    assert plots.quality_points(quality) == {"dense": [(1.0, 24.0)], "svd": [(0.89, 99.0)]}


def test_make_plots_draws_present_inputs_only(tmp_path):
    (tmp_path / "offline_sweep.json").write_text(json.dumps(_sweep()))
    serving = {"tag": "t", "results": [{"max_concurrency": c, "output_throughput": 10.0 * c, "p50_ttft_ms": 5.0,
                                        "p90_ttft_ms": 6.0, "p99_ttft_ms": 7.0, "p50_itl_ms": 1.0,
                                        "p90_itl_ms": 2.0, "p99_itl_ms": 3.0} for c in (1, 4)]}
    (tmp_path / "serving_t.json").write_text(json.dumps(serving))
    written = plots.make_plots(tmp_path)
    assert {p.name for p in written} == {"serving_throughput.png", "serving_latency.png", "offline_speedup_vs_keep.png"}
    assert all(p.stat().st_size > 1000 for p in written)
    assert not (tmp_path / "quality_vs_size.png").exists()
