"""The one decode loop over a :class:`CausalLM`, and the torch cache policies.

A ``CausalLM`` is anything with ``prefill(ids [B, T], attention_mask=None) -> logits [B, V]``
(which starts new sequences; a 0/1 mask marks left padding) and ``step(tokens [B, 1]) ->
logits [B, V]``. :func:`decode_tokens` streams one prompt; :func:`decode_batch` decodes a
batch (the ONNX generator's ``generate_batch`` and the benchmark runners, whose timers read
its ``marks``). :class:`DynamicTorchLM` runs a
transformers model over a ``DynamicCache``; :class:`StaticTorchLM` over a ``StaticCache``
with the one-token step optionally compiled (``torch.compile``; CUDA graphs on GPU), which
removes Python dispatch per op and is the fastest decoder at batch 1. The ONNX Runtime
adapter lives in ``factorlm.exporters.onnx.generator``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..format import FactorlmError
from .sampling import SamplingParams, make_generator, sample_next


class CausalLM(Protocol):
    """The calling convention of the decode loop."""

    device: Any

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...

    def step(self, token: torch.Tensor) -> torch.Tensor: ...


@dataclass
class GenerationStats:
    """Timings of one generation, for the CLI and the benchmarks."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str = "length"

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


class DynamicTorchLM:
    """A transformers causal LM over a growing ``DynamicCache``.

    Without a mask no mask or positions are passed (the fastest call); with a left-padding
    mask each row's positions count its real tokens only.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = _device(model)
        self.cache: Any = None
        self.mask: torch.Tensor | None = None

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        extra: dict[str, torch.Tensor] = {}
        self.mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            self.mask = attention_mask.to(self.device, torch.long)
            extra = {"attention_mask": self.mask, "position_ids": (self.mask.cumsum(-1) - 1).clamp(min=0)}
        # logits_to_keep=1: the prompt's other positions need no vocabulary projection
        return self.model(input_ids=input_ids.to(self.device), past_key_values=self.cache, use_cache=True,
                          logits_to_keep=1, **extra).logits[:, -1]

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        extra: dict[str, torch.Tensor] = {}
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
            extra = {"attention_mask": self.mask, "position_ids": self.mask.sum(-1, keepdim=True) - 1}
        return self.model(input_ids=token.to(self.device), past_key_values=self.cache, use_cache=True,
                          **extra).logits[:, -1]


class StaticTorchLM:
    """A transformers causal LM over a ``StaticCache`` of ``max_cache_len`` tokens for batch ``batch``.

    With ``compile=True`` the decode step goes through ``torch.compile(mode=compile_mode)``:
    ``"reduce-overhead"`` captures it as a CUDA graph on GPU; on CPU ``"default"`` lets inductor
    fuse the elementwise work. Prefill always runs eagerly (its shape varies). The cache is
    allocated once and reused by every sequence (``prefill`` resets it).
    """

    def __init__(self, model: Any, max_cache_len: int, compile: bool = False, compile_mode: str | None = None) -> None:
        from transformers import StaticCache

        self.model = model
        self.device = _device(model)
        self.max_cache_len = max_cache_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        if compile_mode is None:
            compile_mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self.graphs = compile and compile_mode == "reduce-overhead"
        self._step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
            torch.compile(self._eager_step, mode=compile_mode, fullgraph=True, dynamic=False) if compile
            else self._eager_step)
        self.position = 0

    def _eager_step(self, token: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=token, cache_position=cache_position, past_key_values=self.cache,
                          use_cache=True).logits[:, -1]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise FactorlmError("the static cache decodes prompts of equal length only (no left padding)")
        if input_ids.shape[1] >= self.max_cache_len:
            raise FactorlmError(f"prompt of {input_ids.shape[1]} tokens does not fit a cache of {self.max_cache_len}")
        if self.cache.is_initialized:
            self.cache.reset()
        pos = torch.arange(input_ids.shape[1], device=self.device)
        self.position = input_ids.shape[1]
        return self.model(input_ids=input_ids.to(self.device), cache_position=pos, past_key_values=self.cache,
                          use_cache=True, logits_to_keep=1).logits[:, -1]

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.position >= self.max_cache_len:
            raise FactorlmError(f"the static cache of {self.max_cache_len} tokens is full")
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()  # graph outputs are reused: clone before the next replay
        cache_position = torch.tensor([self.position], device=self.device)
        self.position += 1
        return self._step(token.to(self.device), cache_position).clone()

    def kv_prefix(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of the filled part of the cache, (keys, values) [B, kv_heads, position, head_dim] per layer.

        The server moves a sequence from this cache into its dynamic batch with them.
        """
        return [(layer.keys[:, :, :self.position].clone(), layer.values[:, :, :self.position].clone())
                for layer in self.cache.layers]


def torch_lm(model: Any, *, compile: bool = False, max_cache_len: int | None = None) -> CausalLM:
    """The cache policy: a dynamic cache eagerly, or a static cache (of the model's context) compiled."""
    if not compile:
        return DynamicTorchLM(model)
    limit = max_cache_len or int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    return StaticTorchLM(model, limit, compile=True)


@torch.inference_mode()
def decode_tokens(lm: CausalLM, input_ids: torch.Tensor, params: SamplingParams, stop_ids: set[int] | None = None,
                  stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield new token ids for one prompt [1, T]: prefill once, then one-token steps; stop ids are not yielded."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise FactorlmError(f"decoding takes one non-empty prompt of shape [1, T], got {tuple(input_ids.shape)}")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = input_ids.shape[1]
    generator = make_generator(params.seed, lm.device)
    stop_ids = params.stop_ids(stop_ids)
    start = time.perf_counter()
    decode_start = start
    logits = lm.prefill(input_ids)
    for step in range(params.max_new_tokens):
        token = sample_next(logits, params, generator)
        token_id = int(token[0].item())
        now = time.perf_counter()
        if step == 0:
            stats.ttft_s, decode_start = now - start, now
        stats.new_tokens, stats.decode_s = step + 1, now - decode_start
        if token_id in stop_ids:
            stats.finish_reason = "stop"
            return
        yield token_id
        if step + 1 == params.max_new_tokens:
            break
        logits = lm.step(token.view(1, 1))
    stats.finish_reason = "length"


@torch.inference_mode()
def decode_batch(lm: CausalLM, input_ids: torch.Tensor, params: SamplingParams, stop_ids: set[int] | None = None,
                 attention_mask: torch.Tensor | None = None,
                 marks: Callable[[str], None] | None = None) -> list[list[int]]:
    """New token ids per row of a batch [B, T] (left-padded when ``attention_mask`` has zeros).

    A row ends at its first stop id (not included); decoding ends when every row has, or
    after ``max_new_tokens``. ``marks("first")`` is called once the first tokens are
    sampled and ``marks("end")`` after the last, before anything is copied to the host, so
    a benchmark times prefill and decode apart. Without stop ids nothing is read back per
    step (a CUDA graph replays without a sync).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise FactorlmError(f"decode_batch takes a non-empty batch of shape [B, T], got {tuple(input_ids.shape)}")
    batch = input_ids.shape[0]
    generator = make_generator(params.seed, lm.device)
    stop_ids = params.stop_ids(stop_ids)
    done = [False] * batch
    out: list[torch.Tensor] = []
    token = sample_next(lm.prefill(input_ids, attention_mask), params, generator)
    if marks:
        marks("first")
    for step in range(params.max_new_tokens):
        out.append(token)
        if stop_ids:
            done = [d or t in stop_ids for d, t in zip(done, token.tolist())]
        if all(done) or step + 1 == params.max_new_tokens:
            break
        token = sample_next(lm.step(token.view(batch, 1)), params, generator)
    if marks:
        marks("end")
    rows = torch.stack(out, dim=1).tolist()
    return [_until_stop(row, stop_ids) for row in rows] if stop_ids else rows


def _until_stop(row: list[int], stop_ids: set[int]) -> list[int]:
    return next((row[:i] for i, t in enumerate(row) if t in stop_ids), row)
