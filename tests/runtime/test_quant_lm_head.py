"""Quantizing the LM head (``quantize --lm-head``): a tied head is untied, the embeddings stay
fp, and every reader computes the stored head codes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from factorlm.cli import main
from factorlm.compressor.quantize import quantize_checkpoint
from factorlm.runtime.checkpoint import load_model
from factorlm.runtime.quant import dequantize
from factorlm.runtime.quant_linear import QuantizedLinear
from factorlm.testing import write_tiny_factored

IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 250, 11, 3]])


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_factored(tmp_path_factory.mktemp("head") / "factored", rank=16, tie_word_embeddings=True)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("bits,group,rounding", [(8, None, "gptq"), (4, 16, "rtn")])
def test_tied_head_is_untied_and_quantized(tied, tmp_path, bits, group, rounding):
    out = tmp_path / "q"
    quantize_checkpoint(tied, out, bits=bits, group_size=group, rounding=rounding, lm_head=True,
                        calib_samples=4, calib_len=32)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["quantization_config"]["quantized_dense"] == ["lm_head"]
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    source = load_model(tied)
    torch.testing.assert_close(tensors["model.embed_tokens.weight"], source.get_input_embeddings().weight)
    model = load_model(out)
    head = model.get_output_embeddings()
    assert isinstance(head, QuantizedLinear)
    assert torch.equal(head.dequantized("weight"), dequantize(tensors["lm_head.weight_qweight"],
                                                             tensors["lm_head.weight_scales"], bits, group))
    # the embeddings were not quantized with the head: lookups are the source's
    assert torch.equal(model.get_input_embeddings().weight, source.get_input_embeddings().weight)
    ref = logits(source)
    rel = ((logits(model) - ref).abs().max() / ref.abs().max()).item()
    assert rel < (0.1 if bits == 8 else 0.5)


def test_quantized_head_through_transformers_and_onnx(tied, tmp_path):
    pytest.importorskip("onnxruntime")
    from transformers import AutoModelForCausalLM

    import factorlm  # noqa: F401  (registers the quantizer)
    from factorlm.exporters.onnx import export_onnx

    out = tmp_path / "q8"
    assert main(["quantize", str(tied), "-o", str(out), "--bits", "8", "--lm-head"]) == 0
    runtime = logits(load_model(out))
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(hf.get_output_embeddings(), QuantizedLinear)
    assert torch.equal(logits(hf), runtime)
    export_onnx(out, tmp_path / "onnx", threads=1)
    meta = json.loads((tmp_path / "onnx" / "factorlm_onnx.json").read_text())
    # every factored part (2 per block linear) and the head run as MatMulNBits from the stored codes
    assert meta["quantization"]["matmuls"] == 2 * 14 + 1
