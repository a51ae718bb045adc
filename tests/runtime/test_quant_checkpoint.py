"""Quantized checkpoints (format version 2): producers, readers, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from factorlm.cli import main
from factorlm.compressor.quantize import quantize_checkpoint
from factorlm.runtime.checkpoint import load_factored, load_model
from factorlm.runtime.format import FactorlmError, read_factored_config
from factorlm.runtime.quant import dequantize
from factorlm.runtime.quant_linear import QuantizedFactoredLinear, QuantizedLinear, quantized_modules
from factorlm.testing import save_tiny_dense, write_tiny_factored

IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 250, 11, 3], [8, 8, 64, 120, 7, 19, 300, 4, 5, 6]])


@pytest.fixture(scope="module")
def factored(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_factored(tmp_path_factory.mktemp("q") / "factored", rank=16)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("bits,group,rounding", [(8, None, "rtn"), (8, None, "gptq"), (4, 16, "rtn"), (4, 16, "gptq")])
def test_quantized_checkpoint_round_trip(factored, tmp_path, bits, group, rounding):
    out = tmp_path / "q"
    quantize_checkpoint(factored, out, bits=bits, group_size=group, rounding=rounding, calib_samples=4, calib_len=32)
    block = json.loads((out / "config.json").read_text())["quantization_config"]
    assert block["format_version"] == 2 and block["bits"] == bits and block["group_size"] == group
    assert block["rounding"] == rounding and block["quantized_dense"] == []
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    assert f"{name}.weight_u" not in tensors
    q, s = tensors[f"{name}.weight_u_qweight"], tensors[f"{name}.weight_u_scales"]
    assert q.dtype == (torch.int8 if bits == 8 else torch.uint8) and s.dtype == torch.float32
    model = load_model(out)
    layer = model.get_submodule(name)
    assert isinstance(layer, QuantizedFactoredLinear) and layer.bits == bits
    # what the layer computes is exactly the stored codes times the stored scales
    assert torch.equal(layer.dequantized("weight_u"), dequantize(q, s, bits, group))
    ref, got = logits(load_model(factored)), logits(model)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    if bits == 8:  # a tiny random-weight model: a loose bound; perplexity on the sample model is in benchmarks
        assert rel < 0.1


def test_int8_logits_identical_through_runtime_and_transformers(factored, tmp_path):
    from transformers import AutoModelForCausalLM

    import factorlm  # noqa: F401  (registers the quantizer)

    out = tmp_path / "q8"
    quantize_checkpoint(factored, out, bits=8, dense=True)
    runtime = logits(load_factored(out))
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert any(isinstance(m, QuantizedFactoredLinear) for m in hf.modules())
    assert torch.equal(logits(hf), runtime)


def test_dense_int8_baseline_in_same_format(tmp_path):
    dense = save_tiny_dense(tmp_path / "dense")
    out = tmp_path / "d8"
    quantize_checkpoint(dense, out, bits=8, dense=True)
    block = read_factored_config(out)
    assert block.ranks == {} and len(block.quantized_dense) == 14
    model = load_model(out)
    assert all(isinstance(m, QuantizedLinear) for m in quantized_modules(model).values())
    ref = logits(load_model(dense))
    assert ((logits(model) - ref).abs().max() / ref.abs().max()).item() < 0.05


def test_version_1_checkpoint_still_loads(factored):
    assert json.loads((factored / "config.json").read_text())["quantization_config"]["format_version"] == 1
    model = load_factored(factored)
    assert not quantized_modules(model)


def test_cli_quantize_and_bad_input(factored, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["quantize", str(factored), "-o", str(out), "--bits", "8"]) == 0
    assert read_factored_config(out).bits == 8
    # already quantized: refused, nothing written
    again = tmp_path / "again"
    assert main(["quantize", str(out), "-o", str(again), "--bits", "8"]) == 2
    assert "already quantized" in capsys.readouterr().err and not again.exists()
    # a group size that does not divide an input dimension: names the module, nothing written
    bad = tmp_path / "bad"
    assert main(["quantize", str(factored), "-o", str(bad), "--bits", "4", "--group-size", "12"]) == 2
    err = capsys.readouterr().err
    assert "does not divide" in err and "module 'model.layers.0." in err and not bad.exists()
    assert main(["quantize", str(factored), "-o", str(bad), "--bits", "8", "--group-size", "16"]) == 2
    assert "4-bit quantization only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", str(factored), "-o", str(bad), "--bits", "3"])
    with pytest.raises(FactorlmError, match="bits must be 4 or 8"):
        quantize_checkpoint(factored, bad, bits=3)
    assert not bad.exists()


@pytest.mark.parametrize("damage", ["missing", "shape"])
def test_bad_scales_name_the_module(factored, tmp_path, damage):
    out = tmp_path / "q"
    quantize_checkpoint(factored, out, bits=8)
    path = out / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.1.self_attn.k_proj.weight_v_scales"
    if damage == "missing":
        del tensors[key]
    else:
        tensors[key] = torch.ones(3)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(FactorlmError, match="k_proj"):
        load_factored(out)


def test_compress_with_factor_bits(tmp_path):
    dense = save_tiny_dense(tmp_path / "dense")
    out = tmp_path / "c8"
    assert main(["compress", str(dense), "-o", str(out), "--keep", "0.5", "--factor-bits", "8",
                 "--rounding", "gptq", "--calib-samples", "2", "--calib-len", "32", "--no-progress"]) == 0
    block = read_factored_config(out)
    assert block.bits == 8 and block.rounding == "gptq" and block.ranks
    assert (out / "factorlm_recipe.yaml").is_file()
    model = load_model(out)
    assert set(quantized_modules(model)) == set(block.ranks)


def test_compress_factor_bits_bad_scheme_fails_before_work(tmp_path, capsys):
    dense = save_tiny_dense(tmp_path / "dense")
    out = tmp_path / "c4"
    assert main(["compress", str(dense), "-o", str(out), "--factor-bits", "8", "--group-size", "32"]) == 2
    assert "4-bit quantization only" in capsys.readouterr().err and not out.exists()
    # int4 groups must divide every rank (a multiple of --rank-multiple): refused before compressing
    assert main(["compress", str(dense), "-o", str(out), "--factor-bits", "4", "--group-size", "16"]) == 2
    assert "does not divide --rank-multiple 8" in capsys.readouterr().err and not out.exists()
    # quantization flags without --factor-bits are refused, not ignored
    assert main(["compress", str(dense), "-o", str(out), "--lm-head"]) == 2
    assert "--lm-head applies to quantized factors" in capsys.readouterr().err and not out.exists()


def test_int8_checkpoint_through_the_server_engine(factored, tmp_path):
    """``factorlm serve``'s torch engine on an int8 checkpoint: greedy tokens equal the runtime's."""
    import asyncio

    from factorlm.runtime.checkpoint import load_tokenizer
    from factorlm.runtime.generate import SamplingParams, generate_tokens
    from factorlm.serving.engine import GenerationRequest
    from factorlm.serving.engines import create_engine

    out = tmp_path / "q8"
    quantize_checkpoint(factored, out, bits=8, dense=True)
    tokenizer = load_tokenizer(out)
    prompts = ["The quick brown fox", "Paris is the capital of"]
    engine = create_engine("torch", out)
    engine.start()

    async def collect(prompt: str) -> list[int]:
        handle = engine.submit(GenerationRequest(tokenizer(prompt).input_ids,
                                                 SamplingParams(max_new_tokens=8, ignore_eos=True)))
        return [t async for event in handle for t in event.token_ids]

    async def both() -> list[list[int]]:
        return await asyncio.gather(*[collect(p) for p in prompts])

    try:
        served = asyncio.run(both())
    finally:
        engine.shutdown()
    model = load_model(out)
    for prompt, tokens in zip(prompts, served):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert tokens == list(generate_tokens(model, ids, SamplingParams(max_new_tokens=8, ignore_eos=True)))


def test_cast_after_load_redoes_the_dequantized_cache(factored, tmp_path):
    out = tmp_path / "q8"
    quantize_checkpoint(factored, out, bits=8)
    model = load_model(out)
    ref = logits(model)
    with torch.no_grad():
        got = model.to(torch.bfloat16)(IDS).logits.float()
    assert got.dtype == torch.float32 and ((got - ref).abs().max() / ref.abs().max()).item() < 0.1


def test_every_kernel_computes_the_stored_weights():
    from factorlm.runtime.factored_linear import FactoredLinear

    fp = FactoredLinear.from_linear(torch.nn.Linear(64, 48, bias=True), 16)
    layer = QuantizedFactoredLinear.from_factored(fp, 8)
    x = torch.randn(3, 64)
    expected = (x @ layer.dequantized("weight_v").T) @ layer.dequantized("weight_u").T + layer.bias
    for kernel in ("cached", "dequant", "int8pack"):
        layer.prepare(kernel)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(FactorlmError, match="unknown quantized kernel"):
        layer.prepare("fast")
