"""The torch runtime on a CUDA GPU for the offline benchmark: bf16 weights, a static KV
cache, the one-token decode step compiled with CUDA graphs, timed with CUDA events.

Decode at batch 1 on a GPU is dominated by kernel-launch overhead unless the step is
replayed as a CUDA graph; a static cache (fixed shapes, in-place updates) is what makes
the step capturable. ``StaticGreedyDecoder`` is device-generic (the CPU tests run it
eagerly and check it against the DynamicCache loop); ``CudaTorchRunner`` adds bf16,
``torch.compile(mode="reduce-overhead")`` and CUDA-event timing, and refuses to load
without a GPU so the benchmark skips it cleanly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..runtime.decode import SamplingParams, StaticTorchLM, decode_batch
from .runner import BenchConfig, EngineUnavailable, RunTiming, as_prompt_lists

log = logging.getLogger(__name__)


class StaticGreedyDecoder:
    """Greedy decoding of a batch through the runtime's static-cache ``StaticTorchLM`` and decode loop.

    The decoder itself (static cache, compiled step, CUDA graphs) and the loop live in
    ``factorlm.runtime.decode``; this only checks the length and hands the timers' marks on.
    """

    def __init__(self, model: Any, max_cache_len: int, compile: bool = False,
                 compile_mode: str = "reduce-overhead") -> None:
        self.lm = StaticTorchLM(model, max_cache_len, compile=compile, compile_mode=compile_mode)
        self.max_cache_len = max_cache_len

    def generate(self, ids: torch.Tensor, new_tokens: int,
                 marks: Callable[[str], None] | None = None) -> torch.Tensor:
        """Greedy tokens [B, new_tokens]; ``marks('first')`` / ``marks('end')`` let a caller time the phases."""
        if ids.shape[1] + new_tokens > self.max_cache_len:
            raise ValueError(f"{ids.shape[1]} + {new_tokens} tokens exceed the cache of {self.max_cache_len}")
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        return torch.tensor(decode_batch(self.lm, ids, params, marks=marks))


class CudaTorchRunner:
    """The factorlm torch runtime on CUDA in bf16 with one compiled static-cache decoder per batch size."""

    element_bytes = 2
    kv_element_bytes = 2
    file_weight_bytes = None
    max_batch = None
    memory_kind = "cuda"

    def __init__(self, model_dir: Path, config: BenchConfig) -> None:
        if not torch.cuda.is_available():
            raise EngineUnavailable("no CUDA device visible to torch (torch.cuda.is_available() is False)")
        from ..runtime.checkpoint import load_model

        self.model = load_model(model_dir, dtype=torch.bfloat16, device="cuda")
        self.max_cache_len = config.prompt_tokens + config.new_tokens + 8
        self.compile = config.compile
        self.decoders: dict[int, StaticGreedyDecoder] = {}
        self.last_tokens: list[list[int]] = []

    def run(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> RunTiming:
        ids = torch.tensor(as_prompt_lists(prompts), device="cuda")
        batch = ids.shape[0]
        if batch not in self.decoders:
            self.decoders[batch] = StaticGreedyDecoder(self.model, self.max_cache_len, compile=self.compile)
        events = {k: torch.cuda.Event(enable_timing=True) for k in ("start", "first", "end")}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        events["start"].record()
        tokens = self.decoders[batch].generate(ids, new_tokens, marks=lambda k: events[k].record())
        torch.cuda.synchronize()
        self.last_tokens = tokens.tolist()
        ttft = events["start"].elapsed_time(events["first"]) / 1e3
        decode = events["first"].elapsed_time(events["end"]) / 1e3
        return RunTiming(ttft, decode, batch, ids.shape[1], new_tokens,
                         peak_memory_bytes=torch.cuda.max_memory_allocated())

    def close(self) -> None:
        self.decoders.clear()
        del self.model
        torch.cuda.empty_cache()
