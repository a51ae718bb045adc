"""The ``factorlm`` QuantizationConfig: registration, config parsing, per-layer methods (no engine)."""

from __future__ import annotations

import pytest
import torch

from factorlm.runtime.format import FactoredConfig, FactorlmError

pytestmark = pytest.mark.vllm

RANKS = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.o_proj": 12,
         "model.layers.0.mlp.up_proj": 14}


@pytest.fixture(scope="module")
def config_cls(vllm_module):
    from factorlm.exporters.vllm import register
    from factorlm.exporters.vllm.config import FactorlmVllmConfig

    register()
    register()  # idempotent
    return FactorlmVllmConfig


def _config(config_cls):
    config = config_cls.from_config(FactoredConfig(ranks=dict(RANKS)).to_dict())
    config.packed_modules_mapping.update({"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                          "gate_up_proj": ["gate_proj", "up_proj"]})
    return config


def test_registered_under_factorlm(config_cls) -> None:
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    assert get_quantization_config("factorlm") is config_cls
    assert QUANTIZATION_METHODS.count("factorlm") == 1


def test_bad_blocks_fail_with_factorlm_messages(config_cls) -> None:
    block = FactoredConfig(ranks=dict(RANKS)).to_dict()
    with pytest.raises(FactorlmError, match="unknown factorlm format_version 4"):
        config_cls.from_config({**block, "format_version": 4})
    with pytest.raises(FactorlmError, match="format_version 2 .quantized. but field 'bits' is missing"):
        config_cls.from_config({**block, "format_version": 2})
    with pytest.raises(FactorlmError, match="model.layers.0.mlp.up_proj.*invalid rank 0"):
        config_cls.from_config({**block, "ranks": {**RANKS, "model.layers.0.mlp.up_proj": 0}})


def test_fused_layers_map_back_to_checkpoint_pieces(config_cls) -> None:
    config = _config(config_cls)
    assert config.piece_names("model.layers.0.self_attn.qkv_proj") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    assert config.piece_names("model.layers.0.mlp.down_proj") == ["model.layers.0.mlp.down_proj"]


def test_model_renames_apply_to_ranks(config_cls) -> None:
    from vllm.model_executor.models.utils import WeightsMapper

    config = _config(config_cls)
    config.apply_vllm_mapper(WeightsMapper(orig_to_new_prefix={"model.": "language_model.model."}))
    assert config.ranks["language_model.model.layers.0.self_attn.q_proj"] == 8
    assert "model.layers.0.self_attn.q_proj" not in config.ranks


def test_only_linear_layers_get_a_method(config_cls) -> None:
    config = _config(config_cls)
    assert config.get_quant_method(torch.nn.Embedding(4, 4), "model.embed_tokens") is None
    assert config.get_name() == "factorlm"
    assert torch.float32 in config.get_supported_act_dtypes()


def _quant_config(config_cls, bits: int, group: int | None):
    block = FactoredConfig(ranks=dict(RANKS), bits=bits, group_size=group, quantized_dense=["lm_head"])
    return config_cls.from_config(block.to_dict())


@pytest.mark.parametrize("bits,group", [(8, None), (4, 16)], ids=["int8", "int4-g16"])
@pytest.mark.parametrize("tp_rank,tp_size", [(0, 1), (1, 2)])
def test_quantized_lm_head_loads_its_vocab_shard(config_cls, monkeypatch, bits, group, tp_rank, tp_size) -> None:
    """A vocab of 300 pads to 320: each rank dequantizes its own rows, padding rows are zero."""
    from vllm.model_executor.layers import vocab_parallel_embedding as vpe

    from factorlm.exporters.vllm.head import QuantizedHeadMethod
    from factorlm.runtime.quant import dequantize, quantize_rtn

    monkeypatch.setattr(vpe, "get_tensor_model_parallel_rank", lambda: tp_rank)
    monkeypatch.setattr(vpe, "get_tensor_model_parallel_world_size", lambda: tp_size)
    config = _quant_config(config_cls, bits, group)
    vocab, hidden = 300, 32
    head = vpe.ParallelLMHead(vocab, hidden, params_dtype=torch.float32, quant_config=config, prefix="lm_head")
    assert isinstance(head.quant_method, QuantizedHeadMethod)
    qweight, scales = quantize_rtn(torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(0)), bits, group)
    params = dict(head.named_parameters())
    params["weight_qweight"].weight_loader(params["weight_qweight"], qweight)
    params["weight_scales"].weight_loader(params["weight_scales"], scales)
    head.quant_method.process_weights_after_loading(head)

    assert not hasattr(head, "weight_qweight") and head.weight.dtype == torch.float32
    start, end = head.shard_indices.org_vocab_start_index, head.shard_indices.org_vocab_end_index
    rows = end - start
    assert head.weight.shape == (head.num_embeddings_per_partition, hidden) == (320 // tp_size, hidden)
    assert torch.equal(head.weight[:rows], dequantize(qweight, scales, bits, group)[start:end])
    assert not head.weight[rows:].any()
    x = torch.randn(3, hidden)
    torch.testing.assert_close(head.quant_method.apply(head, x), x @ head.weight.T)


def test_quantized_lm_head_refuses_bad_tensors_and_tying(config_cls) -> None:
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    config = _quant_config(config_cls, 8, None)
    head = ParallelLMHead(64, 32, params_dtype=torch.float32, quant_config=config, prefix="lm_head", disable_tp=True)
    param = head.weight_qweight
    with pytest.raises(FactorlmError, match="lm_head.weight_qweight: stored as torch.uint8, expected torch.int8"):
        param.weight_loader(param, torch.zeros(64, 16, dtype=torch.uint8))
    with pytest.raises(FactorlmError, match=r"lm_head.weight_qweight: stored shape \(64, 16\) does not fit"):
        param.weight_loader(param, torch.zeros(64, 16, dtype=torch.int8))
    with pytest.raises(FactorlmError, match="cannot be tied"):
        head.tie_weights(VocabParallelEmbedding(64, 32, params_dtype=torch.float32, disable_tp=True))
    # the input embeddings and an unlisted head stay vLLM's own
    assert VocabParallelEmbedding(64, 32, quant_config=config, disable_tp=True).quant_method.__class__.__name__ \
        == "UnquantizedEmbeddingMethod"
    assert config.get_quant_method(head, "model.lm_head_2") is None
