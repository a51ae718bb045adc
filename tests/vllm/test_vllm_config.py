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
    with pytest.raises(FactorlmError, match="unknown factorlm format_version 3"):
        config_cls.from_config({**block, "format_version": 3})
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
