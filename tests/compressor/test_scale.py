"""Dtype-true and sharded checkpoints, and file hygiene of the save (issue: real models at real scale)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from factorlm.compressor.pipeline import CompressionRecipe, compress_checkpoint, source_dtype
from factorlm.runtime.checkpoint import load_factored, partial_dir, save_factored, factorize_model
from factorlm.runtime.arch import compressible_linears
from factorlm.runtime.format import FactorlmError
from factorlm.runtime.safetensors_header import read_headers
from factorlm.runtime.checkpoint import safetensors_files
from factorlm.testing import make_tiny_model

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4]])


def _source(path, dtype: torch.dtype, shard: str | None = None):
    model, tok = make_tiny_model()
    model.to(dtype).save_pretrained(path, max_shard_size=shard or "5GB")
    tok.save_pretrained(path)
    return path


def _logits(path) -> torch.Tensor:
    with torch.no_grad():
        return load_factored(path, dtype=torch.float32)(IDS).logits


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_source_gives_a_checkpoint_of_that_dtype(tmp_path, dtype, tol):
    src = _source(tmp_path / "src", dtype)
    path, _ = compress_checkpoint(src, tmp_path / "half", CompressionRecipe(keep=0.6), progress=False)
    ref, _ = compress_checkpoint(src, tmp_path / "fp32", CompressionRecipe(keep=0.6), progress=False, dtype="fp32")
    name = str(dtype).removeprefix("torch.")
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == name and config["quantization_config"]["factor_dtype"] == name
    assert {h.dtype for h in read_headers(safetensors_files(path)).values()} == {name}
    assert {h.dtype for h in read_headers(safetensors_files(ref)).values()} == {"float32"}
    model = load_factored(path)
    assert {p.dtype for p in model.parameters()} == {dtype}
    got, want = _logits(path), _logits(ref)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < tol, rel
    # half the bytes of the fp32 compression, give or take the headers
    size = sum(f.stat().st_size for f in safetensors_files(path))
    ref_size = sum(f.stat().st_size for f in safetensors_files(ref))
    assert abs(size / ref_size - 0.5) < 0.02


def test_dtype_flag_overrides_the_source(tmp_path):
    src = _source(tmp_path / "src", torch.float32)
    assert source_dtype(src) == torch.float32
    path, _ = compress_checkpoint(src, tmp_path / "out", CompressionRecipe(keep=0.6), progress=False, dtype="bf16")
    assert json.loads((path / "config.json").read_text())["quantization_config"]["factor_dtype"] == "bfloat16"
    with pytest.raises(FactorlmError, match="--dtype"):
        compress_checkpoint(src, tmp_path / "bad", CompressionRecipe(keep=0.6), progress=False, dtype="int8")
    assert not (tmp_path / "bad").exists()


def test_sharded_source_and_output_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    src = _source(tmp_path / "src", torch.bfloat16, shard="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    path, _ = compress_checkpoint(src, tmp_path / "out", CompressionRecipe(keep=0.6), progress=False,
                                  max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (path / "model.safetensors").exists()
    ours = load_factored(path)
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert next(hf.parameters()).dtype == torch.bfloat16  # transformers honours config.json's dtype
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, ours(IDS).logits)


def test_sharded_output_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from factorlm.exporters.onnx.export import export_onnx

    src = _source(tmp_path / "src", torch.bfloat16)
    path, _ = compress_checkpoint(src, tmp_path / "out", CompressionRecipe(keep=0.6), progress=False,
                                  max_shard_size="20KB")
    meta = export_onnx(path, tmp_path / "onnx")  # validates against the torch model
    assert (tmp_path / "onnx").is_dir() and meta


def test_save_uses_umask_permissions_and_removes_a_stale_partial(tmp_path):
    model, tok = make_tiny_model()
    factorize_model(model, {n: 8 for n in compressible_linears(model)})
    out = tmp_path / "ck"
    stale = partial_dir(out)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")  # what a killed save leaves
    old = os.umask(0o022)
    try:
        save_factored(model, out, tokenizer=tok)
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name


def test_cli_dtype_and_shard_flags(tmp_path, capsys):
    from factorlm.cli import main

    src = _source(tmp_path / "src", torch.float16)
    out = tmp_path / "out"
    assert main(["compress", str(src), "-o", str(out), "--keep", "0.6", "--dtype", "bf16",
                 "--max-shard-size", "20KB", "--no-progress"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["factor_dtype"] == "bfloat16"
    assert main(["inspect", "--verify", str(out)]) == 0  # the header checks read every shard
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(src), "-o", str(tmp_path / "bad"), "--max-shard-size", "5XB"])
    assert exc.value.code == 2 and "--max-shard-size" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.gpu
def test_cuda_compress_of_a_bf16_source_matches_cpu(tmp_path):
    """--device cuda: the fp32 math runs on the GPU, the bf16 checkpoint matches the CPU one."""
    src = _source(tmp_path / "src", torch.bfloat16)
    paths = {}
    for device in ("cpu", "cuda"):
        paths[device], _ = compress_checkpoint(src, tmp_path / device, CompressionRecipe(keep=0.6, device=device),
                                               progress=False)
    assert json.loads((paths["cuda"] / "config.json").read_text())["quantization_config"]["factor_dtype"] == "bfloat16"
    got, want = _logits(paths["cuda"]), _logits(paths["cpu"])
    assert ((got - want).norm() / want.norm()).item() < 0.02
