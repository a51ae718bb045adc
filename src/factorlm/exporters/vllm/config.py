"""The vLLM QuantizationConfig named ``factorlm``: reads the checkpoint's config block.

vLLM picks a quantization method by ``config.json`` → ``quantization_config.quant_method``
and builds this class with :meth:`FactorlmVllmConfig.from_config` (an unknown
``format_version`` or a malformed block fails here, with factorlm's message). While the
model is built, every linear asks :meth:`get_quant_method` with its vLLM name; fused
layers (``qkv_proj``, ``gate_up_proj``) are mapped back to the checkpoint's pieces through
the model's ``packed_modules_mapping``, each piece with its own rank or dense. A quantized
LM head (``lm_head`` in ``quantized_dense``) gets the head method of ``head.py``, and so do
int8 input embeddings (``quantized_embeddings``, format version 3): the same vocab-sharded
codes and per-row scales, dequantized at load.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from ...runtime.format import QUANT_METHOD, FactoredConfig, FactorlmError

logger = logging.getLogger(__name__)


class FactorlmVllmConfig(QuantizationConfig):
    """vLLM's view of a factored checkpoint: a rank per module, by checkpoint name."""

    def __init__(self, block: FactoredConfig) -> None:
        super().__init__()
        self.block = block
        self.ranks: dict[str, int] = dict(block.ranks)
        self.quantized_dense: set[str] = set(block.quantized_dense)
        self.quantized_embeddings: set[str] = set(block.quantized_embeddings)

    def __repr__(self) -> str:
        return f"FactorlmVllmConfig(format_version={self.block.format_version}, factored_modules={len(self.ranks)})"

    def get_name(self) -> str:  # type: ignore[override]
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # plain GEMMs: any GPU (and the CPU)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the block lives in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FactorlmVllmConfig":
        block = FactoredConfig.from_dict(config, source="config.json quantization_config")
        if block.correctors == "separate":
            raise FactorlmError("config.json quantization_config: this checkpoint keeps its correctors separate "
                                "(for training); run `factorlm fold DIR -o OUT` and serve OUT")
        return cls(block)

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Rename checkpoint module names the way the model renames its modules (if it does)."""
        self.ranks = hf_to_vllm_mapper.apply_dict(self.ranks)
        if self.quantized_dense:
            self.quantized_dense = set(hf_to_vllm_mapper.apply_list(sorted(self.quantized_dense)))
        if self.quantized_embeddings:
            self.quantized_embeddings = set(hf_to_vllm_mapper.apply_list(sorted(self.quantized_embeddings)))

    def piece_names(self, prefix: str) -> list[str]:
        """Checkpoint names of the pieces of the vLLM layer ``prefix`` (one unless fused)."""
        parent, _, leaf = prefix.rpartition(".")
        pieces = self.packed_modules_mapping.get(leaf)
        if not pieces:
            return [prefix]
        return [f"{parent}.{piece}" if parent else piece for piece in pieces]

    def _is_input_embedding(self, layer: torch.nn.Module, prefix: str) -> bool:
        """The model's input embeddings: listed by name, or (as Llama builds them) the vocab-parallel
        embedding created without a prefix that is not the LM head."""
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

        if isinstance(layer, ParallelLMHead):
            return False
        return prefix in self.quantized_embeddings or not prefix

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

        if isinstance(layer, VocabParallelEmbedding):
            if prefix and prefix in self.quantized_dense:  # `quantize --lm-head`: codes + scales on disk
                from .head import QuantizedHeadMethod

                return QuantizedHeadMethod(int(self.block.bits or 0), self.block.group_size)
            if self.quantized_embeddings and self._is_input_embedding(layer, prefix):
                from .head import QuantizedHeadMethod  # `quantize --embeddings`: int8 rows, per-row scales

                return QuantizedHeadMethod(8, None)
            return None  # fp embeddings and an fp lm_head: unquantized
        if not isinstance(layer, LinearBase):
            return None  # attention and the rest: unquantized
        names = self.piece_names(prefix)
        ranks = [self.ranks.get(name) for name in names]
        quantized = [name in self.quantized_dense for name in names]
        if all(rank is None for rank in ranks) and not any(quantized):
            return UnquantizedLinearMethod()
        from .linear import FactoredLinearMethod

        if self.block.quantized:  # format version 2: dequantized at load (see linear.py)
            scheme = (int(self.block.bits or 0), self.block.group_size)
            return FactoredLinearMethod(names, ranks, scheme, quantized)
        return FactoredLinearMethod(names, ranks)


def register_quant_config() -> type[FactorlmVllmConfig]:
    """Register the class under ``factorlm`` (re-registering replaces it, so this is idempotent)."""
    return register_quantization_config(QUANT_METHOD)(FactorlmVllmConfig)
