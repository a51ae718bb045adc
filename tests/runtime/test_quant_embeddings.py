"""int8 input embeddings (``quantize --embeddings``, format version 3): what is stored, that every
reader looks up exactly ``codes * scale`` per row, and the bad input that is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from factorlm.cli import main
from factorlm.compressor.quantize import quantize_checkpoint
from factorlm.runtime.checkpoint import load_model
from factorlm.runtime.format import FactorlmError, FactoredConfig, FormatError, read_factored_config
from factorlm.runtime.quant_embedding import QuantizedEmbedding
from factorlm.runtime.safetensors_header import read_headers
from factorlm.runtime.verify import checkpoint_problems, meta_skeleton
from factorlm.testing import write_tiny_factored

IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 250, 11, 3], [8, 8, 64, 120, 7, 19, 300, 4, 5, 6]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory):
    return write_tiny_factored(tmp_path_factory.mktemp("emb") / "factored", rank=16, tie_word_embeddings=True)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # gemma scales its embeddings by sqrt(hidden)
def test_embeddings_stored_int8_and_read_as_codes_times_scales(tmp_path, arch):
    src = write_tiny_factored(tmp_path / "f", arch, rank=16, tie_word_embeddings=True)
    plain, emb = tmp_path / "q8", tmp_path / "q8e"
    quantize_checkpoint(src, plain, bits=8, lm_head=True)
    quantize_checkpoint(src, emb, bits=8, lm_head=True, embeddings=True)
    block = json.loads((emb / "config.json").read_text())["quantization_config"]
    assert block["format_version"] == 3 and block["quantized_embeddings"] == ["model.embed_tokens"]
    assert json.loads((plain / "config.json").read_text())["quantization_config"]["format_version"] == 2
    tensors = load_file(emb / "model.safetensors")
    codes, scales = tensors["model.embed_tokens.weight_qweight"], tensors["model.embed_tokens.weight_scales"]
    assert "model.embed_tokens.weight" not in tensors and codes.dtype == torch.int8 and scales.dim() == 1
    table = load_file(plain / "model.safetensors")["model.embed_tokens.weight"]
    # round to nearest per row: every entry within half a step of its row's (signed) scale
    assert ((codes.float() * scales[:, None] - table).abs() <= scales.abs()[:, None] / 2 + 1e-6).all()
    assert (emb / "model.safetensors").stat().st_size < (plain / "model.safetensors").stat().st_size

    model = load_model(emb)
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    # the same model with its fp table replaced by codes * scales gives the same logits
    ref = load_model(plain)
    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(codes.float() * scales[:, None])
    torch.testing.assert_close(logits(model), logits(ref), rtol=1e-5, atol=1e-5)


def test_int8_embeddings_through_transformers_onnx_and_the_server(tied, tmp_path):
    pytest.importorskip("onnxruntime")
    import asyncio

    from transformers import AutoModelForCausalLM

    import factorlm  # noqa: F401  (registers the quantizer)
    from factorlm.exporters.onnx import OnnxGenerator, export_onnx
    from factorlm.runtime.generate import SamplingParams, generate_tokens
    from factorlm.serving.engine import GenerationRequest
    from factorlm.serving.engines import create_engine

    out = tmp_path / "q"
    assert main(["quantize", str(tied), "-o", str(out), "--bits", "8", "--lm-head", "--embeddings"]) == 0
    model = load_model(out)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(hf.get_input_embeddings(), QuantizedEmbedding)
    assert torch.equal(logits(hf), logits(model))

    meta = export_onnx(out, tmp_path / "onnx", threads=1)  # validated at fp32 tolerance (accuracy level 0)
    assert meta["quantization"]["int8_embeddings"] == 1 and meta["validation"]["argmax_mismatches"] == 0
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.initializer}
    stored = load_file(out / "model.safetensors")["model.embed_tokens.weight_qweight"]
    assert torch.equal(torch.from_numpy(numpy_helper.to_array(inits["model.embed_tokens.int8.codes"])), stored)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    want = list(generate_tokens(model, IDS[:1], params))
    assert list(OnnxGenerator(tmp_path / "onnx", threads=1, device="cpu").generate_tokens(IDS[:1], params)) == want

    engine = create_engine("torch", out)
    engine.start()

    async def collect() -> list[int]:
        handle = engine.submit(GenerationRequest(IDS[0].tolist(), params))
        return [t async for event in handle for t in event.token_ids]

    try:
        served = asyncio.run(collect())
    finally:
        engine.shutdown()
    assert served == list(generate_tokens(model, IDS[:1], params))


def test_bad_input_is_refused_before_anything_is_written(tied, tmp_path, capsys):
    out = tmp_path / "q"
    with pytest.raises(FactorlmError, match="--lm-head"):  # a tied head would lose its weight
        quantize_checkpoint(tied, out, bits=8, embeddings=True)
    assert not out.exists()
    assert main(["compress", "sample", "-o", str(tmp_path / "c"), "--embeddings"]) == 2
    assert "--embeddings applies to quantized factors" in capsys.readouterr().err
    # the block: version 3 needs quantized embeddings, and they need version 3 and bits
    with pytest.raises(FormatError, match="format_version 3"):
        FactoredConfig(ranks={}, bits=8, quantized_embeddings=["model.embed_tokens"], format_version=2)
    with pytest.raises(FormatError, match="needs format_version 2"):
        FactoredConfig(ranks={}, bits=8, format_version=3)
    with pytest.raises(FormatError, match="need 'bits'"):
        FactoredConfig(ranks={}, quantized_embeddings=["model.embed_tokens"], format_version=1)


def test_damaged_checkpoint_names_the_embedding(tied, tmp_path):
    out = tmp_path / "q"
    quantize_checkpoint(tied, out, bits=8, lm_head=True, embeddings=True)
    tensors = load_file(out / "model.safetensors")
    # the fp table stored instead of the codes: both the missing codes and the stray table are named
    fp = dict(tensors)
    fp["model.embed_tokens.weight"] = fp.pop("model.embed_tokens.weight_qweight").float()
    save_file(fp, str(out / "model.safetensors"), metadata={"format": "pt"})

    problems = checkpoint_problems(meta_skeleton(out), read_headers([out / "model.safetensors"]),
                                   read_factored_config(out), out)
    assert any("missing tensor 'model.embed_tokens.weight_qweight'" in p for p in problems)
    assert any("unquantized table of module 'model.embed_tokens'" in p for p in problems)
    with pytest.raises(FormatError, match="model.embed_tokens.weight_qweight"):
        load_model(out)
    # scales of the wrong shape
    bad = dict(tensors)
    bad["model.embed_tokens.weight_scales"] = bad["model.embed_tokens.weight_scales"][:-1].clone()
    save_file(bad, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match="weight_scales"):
        load_model(out)
    # config says tied again: refused, the head would otherwise read the int8 table
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config))
    problems = checkpoint_problems(meta_skeleton(out), read_headers([out / "model.safetensors"]),
                                   read_factored_config(out), out)
    assert any("'model.embed_tokens' listed in 'quantized_embeddings' is tied to the LM head" in p for p in problems)
    with pytest.raises(FormatError, match="not an untied Linear"):  # the quantized head's problem comes first
        load_model(out)


def test_inspect_says_how_the_weights_are_stored(tied, tmp_path, capsys):
    out = tmp_path / "q"
    quantize_checkpoint(tied, out, bits=8, lm_head=True, embeddings=True)
    assert main(["inspect", str(out), "--verify"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("OK: ")
    assert lines[1] == ("quantized (format version 3): 14 factored modules int8 per output channel, rtn; "
                        "also the LM head, int8 embeddings")
