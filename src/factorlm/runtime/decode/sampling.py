"""The one sampler: greedy, temperature, top-k, top-p, seeded; pure functions of logits.

Every decode path (``factorlm generate``, the server's engines, the ONNX generator, the
benchmarks) picks its next token with :func:`sample_next`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..format import FactorlmError


@dataclass
class SamplingParams:
    """What to generate. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise FactorlmError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise FactorlmError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FactorlmError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise FactorlmError(f"top_k must be >= 0, got {self.top_k}")

    def stop_ids(self, eos: set[int] | None) -> set[int]:
        """Token ids that end a sequence: the EOS ids (unless ``ignore_eos``) plus ``stop_token_ids``."""
        return set() if self.ignore_eos else set(eos or ()) | set(self.stop_token_ids or ())


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits [B, V] outside the top-k set and the top-p nucleus with -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        remove[..., 0] = False  # the most likely token always survives, even for a tiny top_p
        remove_orig = torch.zeros_like(remove).scatter(-1, order, remove)
        logits = logits.masked_fill(remove_orig, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V] (or one id [] from a row [V])."""
    if logits.dim() == 1:
        return sample_next(logits.unsqueeze(0), params, generator)[0]
    if params.temperature == 0:
        return logits.argmax(-1)
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: Any = "cpu") -> torch.Generator | None:
    """A seeded generator on ``device``, or None (torch's global RNG) without a seed."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """EOS ids from the generation config, the model config and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
