"""Larger-than-RAM compression: streamed output, resume after a kill, flat memory, bad sources."""

from __future__ import annotations

import json

import pytest
import torch

from factorlm.compressor import streamed
from factorlm.compressor.calib_sources import SAMPLE_SOURCE, calibration_windows
from factorlm.compressor.pipeline import CompressionRecipe, compress_checkpoint, compress_model
from factorlm.compressor.resume import ResumeState
from factorlm.compressor.source import SafetensorsSource, materialized_params, resolve_source
from factorlm.runtime.arch import decoder_layers
from factorlm.runtime.checkpoint import load_model, partial_dir, save_factored
from factorlm.runtime.format import FactoredConfig, FactorlmError, FormatError
from factorlm.testing import checkpoint_tensors, make_tiny_model, save_tiny_dense

CALIB = dict(calib_samples=4, calib_len=16)


def _source(path, dtype=torch.bfloat16, shard=None, arch="llama", **overrides):
    return save_tiny_dense(path, arch, dtype=dtype, max_shard_size=shard, **overrides)


def _in_ram(src, out, recipe: CompressionRecipe, dtype: torch.dtype):
    """The whole-model path (load everything in fp32, compress, save), as compress_checkpoint did before."""
    from factorlm.runtime.checkpoint import load_tokenizer

    model = load_model(src, dtype=torch.float32)
    tok = load_tokenizer(src)
    needs = recipe.method != "svd" or recipe.allocation != "uniform"
    calib = calibration_windows(tok, SAMPLE_SOURCE, recipe.calib_samples, recipe.calib_len, recipe.seed) \
        if needs else None
    report = compress_model(model, recipe, calib, progress=False)
    dense = [r["module"] for r in report["layers"] if r["dense"]]
    save_factored(model, out, tokenizer=tok, config=FactoredConfig(ranks={}, dense=dense), dtype=dtype)
    return out


def _same_checkpoint(a, b) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    assert ca == cb


@pytest.mark.parametrize("method, allocation, arch, shard", [
    ("svd", "uniform", "llama", None),
    ("saes", "uniform", "llama", "20KB"),
    ("svd-llm", "energy", "gemma3_text", None),  # tied embeddings, per-layer attention types, spectra pass
])
def test_streamed_output_equals_the_in_ram_path_bit_for_bit(tmp_path, method, allocation, arch, shard):
    """Same fp32 arithmetic in the same order: every tensor and config.json are identical."""
    src = _source(tmp_path / "src", shard=shard, arch=arch)
    if shard:
        assert (src / "model.safetensors.index.json").is_file()
    recipe = dict(method=method, allocation=allocation, keep=0.6, **CALIB)
    path, report = compress_checkpoint(src, tmp_path / "stream", CompressionRecipe(**recipe), progress=False,
                                       max_shard_size="30KB")
    assert report["totals"]["streamed"] and len(report["totals"]["block_time_s"]) == 2
    assert (path / "model.safetensors.index.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "stream"]  # the temporary folder is gone
    assert not {"blocks", "factorlm_resume.json"} & {p.name for p in path.iterdir()}
    ref = _in_ram(src, tmp_path / "ram", CompressionRecipe(**recipe), torch.bfloat16)
    _same_checkpoint(path, ref)


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, block: int) -> None:
    original = ResumeState.block_done

    def block_done(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == block:
            raise _Killed(f"simulated kill after block {index}")

    monkeypatch.setattr(ResumeState, "block_done", block_done)


@pytest.mark.parametrize("method", ["svd", "saes"])
def test_resume_after_a_kill_gives_the_uninterrupted_checkpoint(tmp_path, monkeypatch, method):
    src = _source(tmp_path / "src", num_hidden_layers=4)
    recipe = dict(method=method, keep=0.6, **CALIB)
    full, _ = compress_checkpoint(src, tmp_path / "full", CompressionRecipe(**recipe), progress=False)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _kill_after(m, 1)
        with pytest.raises(_Killed):
            compress_checkpoint(src, out, CompressionRecipe(**recipe), progress=False)
    assert not out.exists() and partial_dir(out).is_dir()  # one clearly named temporary folder
    state = json.loads((partial_dir(out) / "factorlm_resume.json").read_text())
    assert state["finished"] == [0, 1]
    seen: list[int] = []
    original = streamed.SourceBlocks.load
    monkeypatch.setattr(streamed.SourceBlocks, "load", lambda self, i, b: (seen.append(i), original(self, i, b)))
    path, report = compress_checkpoint(src, out, CompressionRecipe(**recipe), progress=False, resume=True)
    assert seen == [2, 3]  # finished blocks are not redone
    assert report["totals"]["resumed_at_block"] == 2 and len(report["layers"]) == 4 * 7
    assert not partial_dir(out).exists()
    _same_checkpoint(path, full)


def test_resume_refuses_a_different_recipe_and_keeps_the_progress(tmp_path, monkeypatch):
    src = _source(tmp_path / "src", num_hidden_layers=3)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _kill_after(m, 0)
        with pytest.raises(_Killed):
            compress_checkpoint(src, out, CompressionRecipe(keep=0.6), progress=False)
    with pytest.raises(FactorlmError, match="recipe differs"):
        compress_checkpoint(src, out, CompressionRecipe(keep=0.5), progress=False, resume=True)
    with pytest.raises(FactorlmError, match="dtype differs"):
        compress_checkpoint(src, out, CompressionRecipe(keep=0.6), progress=False, resume=True, dtype="fp32")
    assert (partial_dir(out) / "blocks" / "block-00000.safetensors").is_file()
    path, _ = compress_checkpoint(src, out, CompressionRecipe(keep=0.6), progress=False, resume=True)
    assert path.is_dir()
    with pytest.raises(FactorlmError, match="--resume"):
        compress_checkpoint(src, tmp_path / "o2", CompressionRecipe(keep=0.6, allocation="ara"), progress=False,
                            resume=True)


def test_cli_resume_flag(tmp_path, monkeypatch):
    from factorlm.cli import main

    src = _source(tmp_path / "src", dtype=torch.float32, num_hidden_layers=3)
    out = tmp_path / "out"
    args = ["compress", str(src), "-o", str(out), "--keep", "0.6", "--no-progress"]
    with monkeypatch.context() as m:
        _kill_after(m, 1)
        with pytest.raises(_Killed):
            main(args)
    assert main([*args, "--resume"]) == 0
    assert main(["inspect", "--verify", str(out)]) == 0


@pytest.mark.parametrize("method", ["svd", "saes"])
def test_at_most_one_block_is_materialized_whatever_the_depth(tmp_path, monkeypatch, method):
    """Count real (non-meta) parameters whenever a block is loaded: one block's worth, for 2 or 6 blocks."""
    peaks = {}
    for depth in (2, 6):
        src = _source(tmp_path / f"src{depth}", num_hidden_layers=depth)
        counts: list[int] = []
        original = streamed.SourceBlocks.load

        def load(self, index, block, counts=counts, original=original):
            original(self, index, block)
            counts.append(materialized_params(self.model))
        monkeypatch.setattr(streamed.SourceBlocks, "load", load)
        compress_checkpoint(src, tmp_path / f"out{depth}", CompressionRecipe(method=method, keep=0.6, **CALIB),
                            progress=False)
        monkeypatch.undo()
        model, _ = make_tiny_model(num_hidden_layers=depth)
        block = sum(p.numel() for p in decoder_layers(model)[0].parameters())
        assert len(counts) == depth and max(counts) == block, (counts, block)
        peaks[depth] = max(counts)
    assert peaks[2] == peaks[6]


def test_index_naming_an_absent_shard_is_refused_before_any_work(tmp_path):
    src = _source(tmp_path / "src", shard="20KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (src / victim).unlink()
    with pytest.raises(FormatError, match=victim):
        compress_checkpoint(src, tmp_path / "out", CompressionRecipe(keep=0.6), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_index_mapping_a_tensor_to_the_wrong_shard_is_refused(tmp_path):
    src = _source(tmp_path / "src", shard="20KB")
    path = src / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][name] = files[1]
    path.write_text(json.dumps(index))
    with pytest.raises(FormatError, match="not found in the shard"):
        SafetensorsSource(src)


def test_hub_ids_resolve_from_the_local_cache_only(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / ("a" * 40)
    _source(snap)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert resolve_source("acme/tiny") == snap
    with pytest.raises(FactorlmError, match="never downloads"):
        resolve_source("acme/absent")
    from factorlm.cli.common import resolve_model_path

    assert resolve_model_path("acme/tiny") == snap  # the CLI's model argument takes the same hub ids
    with pytest.raises(FactorlmError, match="never downloads"):
        resolve_model_path("acme/absent")
