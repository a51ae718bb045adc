"""bench_onnx_fusion.py end to end on a tiny model: both exports, paired ratios, the report."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[2] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fusion_bench_on_a_tiny_model(tmp_path, monkeypatch):
    from factorlm.testing import save_tiny_dense, write_tiny_factored

    bench = _load("bench_onnx_fusion")
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    dense = save_tiny_dense(tmp_path / "dense", "llama")
    fact = write_tiny_factored(tmp_path / "fact", "llama", rank=16)
    assert bench.main([f"dense={dense}", f"fact={fact}", "--batches", "1", "--prompt-tokens", "4",
                       "--new-tokens", "4", "--repeats", "2", "--work", str(tmp_path / "work"), "--name", "t"]) == 0
    result = json.loads((tmp_path / "results" / "t.json").read_text())
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "fact"} and rows["dense"]["plain_vs_first"] == 1.0
    for r in rows.values():
        assert r["nodes_fused"] < r["nodes_plain"] and r["fused_tok_s"] > 0
        assert len(result["samples"][f"{r['model']}/fused/b1"]) == 2
    assert result["fusions"]["fact"]["fused"]["fusions"]["matmul_groups"] == 4  # q/k/v and gate/up of 2 blocks
    assert result["fusions"]["fact"]["plain"]["fusions"] == {}
    # the report can be rewritten from the JSON alone
    (tmp_path / "results" / "t.md").unlink()
    assert bench.main(["--report", str(tmp_path / "results" / "t.json")]) == 0
    assert "| fact | 1 |" in (tmp_path / "results" / "t.md").read_text()
