"""vLLM serves quantized checkpoints (format version 2, dequantized at load): greedy tokens equal the torch runtime's.

The int8 checkpoint is the mixed fused-group layout of ``vllm_helpers.mixed_ranks`` with the
dense pieces quantized too (``dense=True``), so q/k/v and gate/up groups hold quantized
factored and quantized dense pieces side by side; the int4 one uses group size 16. The
``--lm-head`` case quantizes the head of a tied model (untied on the way), so vLLM loads the
head's codes and scales rather than a ``weight``.
"""

from __future__ import annotations

import pytest
from vllm_helpers import make_llm, mixed_ranks, prompt_ids, reference_tokens, shutdown, vllm_tokens

from factorlm.compressor.quantize import quantize_checkpoint
from factorlm.testing import write_tiny_factored

pytestmark = pytest.mark.vllm


def _int4_ranks() -> dict[str, int]:
    return {name: 16 if rank < 16 else 32 for name, rank in mixed_ranks().items()}


@pytest.mark.parametrize("bits,group,ranks", [(8, None, mixed_ranks()), (4, 16, _int4_ranks())],
                         ids=["int8-mixed-dense", "int4-g16"])
def test_quantized_greedy_parity(vllm_module, tmp_path, bits, group, ranks) -> None:
    src = write_tiny_factored(tmp_path / "factored", "llama", ranks=ranks)
    path = tmp_path / "q"
    quantize_checkpoint(src, path, bits=bits, group_size=group, dense=True)
    prompts = prompt_ids(path)
    llm = make_llm(path)
    try:
        assert vllm_tokens(llm, prompts) == reference_tokens(path, prompts)
    finally:
        shutdown(llm)


@pytest.mark.parametrize("bits,group,ranks", [(8, None, mixed_ranks()), (4, 16, _int4_ranks())],
                         ids=["int8", "int4-g16"])
def test_quantized_lm_head_greedy_parity(vllm_module, tmp_path, bits, group, ranks) -> None:
    import json

    src = write_tiny_factored(tmp_path / "factored", "llama", ranks=ranks, tie_word_embeddings=True)
    path = tmp_path / "q"
    quantize_checkpoint(src, path, bits=bits, group_size=group, lm_head=True)
    assert "lm_head" in json.loads((path / "config.json").read_text())["quantization_config"]["quantized_dense"]
    prompts = prompt_ids(path)
    llm = make_llm(path)
    try:
        assert llm.apply_model(_head_state) == [("QuantizedHeadMethod", False)]
        assert vllm_tokens(llm, prompts) == reference_tokens(path, prompts)
    finally:
        shutdown(llm)


def _head_state(model) -> tuple[str, bool]:
    """(method class, whether the codes are still held) of the loaded model's lm_head."""
    return type(model.lm_head.quant_method).__name__, hasattr(model.lm_head, "weight_qweight")


def test_int8_embeddings_greedy_parity(vllm_module, tmp_path) -> None:
    """``--embeddings`` (format version 3): vLLM loads the embedding's int8 rows and scales, not a ``weight``."""
    import json

    src = write_tiny_factored(tmp_path / "factored", "llama", ranks=mixed_ranks(), tie_word_embeddings=True)
    path = tmp_path / "q"
    quantize_checkpoint(src, path, bits=8, lm_head=True, embeddings=True)
    block = json.loads((path / "config.json").read_text())["quantization_config"]
    assert block["format_version"] == 3 and block["quantized_embeddings"] == ["model.embed_tokens"]
    prompts = prompt_ids(path)
    llm = make_llm(path)
    try:
        assert llm.apply_model(_embedding_state) == [("QuantizedHeadMethod", False)]
        assert vllm_tokens(llm, prompts) == reference_tokens(path, prompts)
    finally:
        shutdown(llm)


def _embedding_state(model) -> tuple[str, bool]:
    emb = model.model.embed_tokens
    return type(emb.quant_method).__name__, hasattr(emb, "weight_qweight")
