"""The exported decoder: a flat-IO wrapper around a transformers causal LM and its KV cache.

``torch.onnx.export(dynamo=True)`` traces through ``torch.export``; passing a ``DynamicCache``
object as an input needs pytree registration, so the wrapper takes the past keys/values as
plain tensors, builds the cache inside and returns the presents as plain tensors. IO names
follow the HF/optimum convention that ONNX Runtime tooling (optimum, onnxruntime-genai)
expects: ``input_ids``, ``attention_mask`` (past + new length), ``position_ids``,
``past_key_values.{i}.key|value`` [B, n_kv, past, head_dim] -> ``logits``, ``present.{i}.key|value``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class CacheShape:
    """What the graph's KV inputs look like: layers, KV heads and head size."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> "CacheShape":
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, kv_heads, head_dim)


def input_names(shape: CacheShape) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(shape.num_layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(shape: CacheShape) -> list[str]:
    names = ["logits"]
    for i in range(shape.num_layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


def past_names(shape: CacheShape) -> list[str]:
    return input_names(shape)[3:]


def present_names(shape: CacheShape) -> list[str]:
    return output_names(shape)[1:]


class FlatDecoder(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``.

    The cache is built without the model config so every layer (sliding-window ones too)
    keeps its full history: present length is always past + seq, and the sliding window is
    enforced by the attention mask the model builds, exactly as in the eager runtime.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, return_dict=True)
        flat = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *flat)


def example_inputs(shape: CacheShape, vocab_size: int, dtype: torch.dtype, batch: int = 2, seq: int = 5,
                   past: int = 3) -> tuple[torch.Tensor, ...]:
    """Tracing inputs. Sizes avoid 0 and 1, which torch.export would specialise as constants."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, shape.num_kv_heads, past, shape.head_dim, generator=gen).to(dtype)
          for _ in range(2 * shape.num_layers)]
    return (ids, mask, pos, *kv)


def dynamic_shapes(shape: CacheShape) -> tuple[Any, ...]:
    """Dynamic batch, sequence, past and total lengths; ``*past`` is one nested tuple entry."""
    from torch.export import Dim

    batch, seq, past, total = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
            tuple({0: batch, 2: past} for _ in range(2 * shape.num_layers)))


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: cumsum(mask) - 1, clipped at 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
