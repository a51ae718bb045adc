"""The server's onnx engine: its continuous-batching scheduler over an exported ONNX graph.

The engine "onnx" (registered in :mod:`factorlm.serving.engines`) is the torch engine's
scheduler with ONNX Runtime doing the forward passes. The exporter knows nothing of the
server; the adapter lives here, on the server's side. ``OrtCausalLM`` answers the
small part of the transformers model interface the scheduler uses (``model(input_ids=...,
attention_mask=..., position_ids=..., past_key_values=cache, use_cache=True,
logits_to_keep=...)`` returning ``.logits``, plus ``config`` and ``generation_config``).
The ``DynamicCache`` holds torch views of the ONNX presents, so the scheduler's row merging
and dropping work unchanged. On CPU, numpy/torch conversions of the cache are zero-copy.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..exporters.onnx.generator import OnnxGenerator
from .torch_engine import TorchEngine


class OrtCausalLM(nn.Module):
    """A callable with the transformers causal-LM calling convention over an exported graph."""

    def __init__(self, engine: OnnxGenerator) -> None:
        super().__init__()
        from transformers import AutoConfig, GenerationConfig

        self.engine = engine
        self.config = AutoConfig.from_pretrained(engine.path)
        gen_cfg = engine.path / "generation_config.json"
        self.generation_config = GenerationConfig.from_pretrained(engine.path) if gen_cfg.is_file() else None
        # the scheduler asks next(model.parameters()).device for where to put its tensors
        self.register_parameter("_device_anchor", nn.Parameter(torch.zeros(0), requires_grad=False))

    def _past(self, cache: Any, batch: int) -> list[np.ndarray]:
        shape = self.engine.shape
        empty = np.zeros((batch, shape.num_kv_heads, 0, shape.head_dim), self.engine.kv_dtype)
        past: list[np.ndarray] = []
        for i in range(shape.num_layers):
            layer = cache.layers[i] if cache is not None and i < len(cache.layers) else None
            if layer is None or not getattr(layer, "is_initialized", True) or getattr(layer, "keys", None) is None:
                past += [empty, empty]
            else:
                past += [layer.keys.contiguous().numpy(), layer.values.contiguous().numpy()]
        return past

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool = True,
                logits_to_keep: int = 0, **_: Any) -> SimpleNamespace:
        batch, seq = input_ids.shape
        past = self._past(past_key_values, batch)
        past_len = past[0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + seq, dtype=torch.long)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq).expand(batch, seq)
        names = [i.name for i in self.engine.session.get_inputs()]
        feed = dict(zip(names, [input_ids.cpu().numpy().astype(np.int64), attention_mask.cpu().numpy().astype(np.int64),
                                position_ids.cpu().numpy().astype(np.int64), *past]))
        outputs = self.engine.session.run(None, feed)
        logits = torch.from_numpy(outputs[0])
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        if past_key_values is not None:
            for i in range(self.engine.shape.num_layers):
                keys, values = (torch.from_numpy(outputs[1 + 2 * i]), torch.from_numpy(outputs[2 + 2 * i]))
                past_key_values.update(keys[:, :, past_len:], values[:, :, past_len:], i)
        return SimpleNamespace(logits=logits.float(), past_key_values=past_key_values)


def build_onnx_engine(path: Any, *, threads: int | None, model_name: str, max_batch: int, max_queue: int,
                      max_model_len: int | None) -> TorchEngine:
    """The scheduler over an ``OnnxGenerator`` of the folder ``path`` (CPU execution provider)."""
    if threads:  # the scheduler's own tensor work (cache merging, sampling) runs in torch
        torch.set_num_threads(threads)
    generator = OnnxGenerator(path, threads=threads, device="cpu")
    return TorchEngine(OrtCausalLM(generator), generator.tokenizer, model_name=model_name, max_batch=max_batch,
                       max_queue=max_queue, max_model_len=max_model_len)
