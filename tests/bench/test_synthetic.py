"""Random-weight model pairs for speed benchmarks: shapes, ranks, loading, and a harness run."""

from __future__ import annotations

import json

import pytest
import torch

from factorlm.bench.footprint import ModelFootprint
from factorlm.bench.offline import format_markdown, run_offline
from factorlm.bench.runner import BenchConfig
from factorlm.bench.synthetic import (
    SHAPES,
    random_dense,
    synthetic_config,
    uniform_plan,
    write_synthetic_pair,
)
from factorlm.runtime.checkpoint import load_model
from factorlm.runtime.factored_linear import FactoredLinear
from factorlm.runtime.format import FactorlmError


def test_shapes_are_their_published_configurations():
    one_b = synthetic_config("llama-3.2-1b")
    assert (one_b.hidden_size, one_b.intermediate_size, one_b.num_hidden_layers, one_b.vocab_size) == (
        2048, 8192, 16, 128256)
    with torch.device("meta"):
        small = random_dense("smollm2-135m", dtype=torch.float32, device="meta")
    assert sum(p.numel() for p in small.parameters()) == pytest.approx(134.5e6, rel=0.01)
    with pytest.raises(FactorlmError, match="unknown synthetic shape 'gpt-5'"):
        synthetic_config("gpt-5")


def test_uniform_plan_keeps_the_fraction_in_multiples():
    model = random_dense("tiny", dtype=torch.float32)
    plan = uniform_plan(model, 0.5, multiple=8)
    assert plan and all(r % 8 == 0 for r in plan.values())
    shapes = {n: model.get_submodule(n) for n in plan}
    kept = sum(r * (shapes[n].in_features + shapes[n].out_features) for n, r in plan.items())
    dense = sum(m.in_features * m.out_features for m in shapes.values())
    assert 0.4 < kept / dense < 0.6


def test_synthetic_pair_loads_runs_and_is_cached(tmp_path):
    dense_dir, factored_dir = write_synthetic_pair("tiny", 0.5, tmp_path, dtype=torch.float32, multiple=8)
    factored = load_model(factored_dir, fast_layout=False)
    layers = [m for m in factored.modules() if isinstance(m, FactoredLinear)]
    assert len(layers) == 2 * 7
    ids = torch.tensor([[3, 5, 7, 11]])
    logits = factored(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    fp = {k: ModelFootprint.from_folder(d) for k, d in (("dense", dense_dir), ("factored", factored_dir))}
    assert fp["factored"].weight_bytes(4) < fp["dense"].weight_bytes(4)
    stamp = (factored_dir / "config.json").stat().st_mtime_ns
    assert write_synthetic_pair("tiny", 0.5, tmp_path, dtype=torch.float32, multiple=8)[1] == factored_dir
    assert (factored_dir / "config.json").stat().st_mtime_ns == stamp  # reused, not rebuilt

    config = BenchConfig(engines=["torch"], batches=[1], prompt_tokens=4, new_tokens=3, repeats=1,
                         bandwidth_mib=0, memory="off")
    result = run_offline(dense_dir, factored_dir, config, progress=False)
    result.update(model="synthetic:tiny", keep=0.5)
    assert {r["model"] for r in result["results"]} == {"dense", "factored"}
    assert "random weights with the tiny configuration" in format_markdown(result)
    json.dumps(result)


def test_every_shape_has_a_factorable_plan():
    for shape in SHAPES:
        with torch.device("meta"):
            model = random_dense(shape, dtype=torch.bfloat16, device="meta")
        assert uniform_plan(model, 0.5, multiple=8 if shape == "tiny" else 64)


@pytest.mark.gpu
def test_synthetic_pair_times_on_cuda(tmp_path):
    """Built on the GPU in bf16, timed by the CUDA runner: rates, bandwidth fraction and the GPU's name."""
    dense_dir, factored_dir = write_synthetic_pair("tiny", 0.5, tmp_path, device="cuda", multiple=8)
    config = BenchConfig(engines=["torch"], device="cuda", batches=[1, 2], prompt_tokens=8, new_tokens=6,
                         repeats=1, bandwidth_mib=64, memory="off")
    result = run_offline(dense_dir, factored_dir, config, progress=False)
    assert result["machine"]["gpu"] and not result["skipped"]
    assert len(result["results"]) == 4
    for row in result["results"]:
        assert row["decode_tok_s"] > 0 and row["peak_memory_bytes"] > 0 and 0 < row["bandwidth_fraction"] < 1.5
