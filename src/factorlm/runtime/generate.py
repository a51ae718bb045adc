"""Token generation with a KV cache: greedy or sampled, streamed, with stop strings.

Pure pieces (``sample_next``, ``find_stop``) are functions of tensors/strings; the loop in
``generate_tokens`` runs prefill once and then one-token decode steps against the cache.
Works for any transformers causal LM, dense or factored.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .format import FactorlmError


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
    """Next token ids [B] from last-position logits [B, V]."""
    if params.temperature == 0:
        return logits.argmax(-1)
    scaled = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = scaled.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the earliest stop string begins in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


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


@torch.inference_mode()
def generate_tokens(
    model: Any,
    input_ids: torch.Tensor,
    params: SamplingParams,
    stop_ids: set[int] | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield new token ids for a single prompt ``input_ids`` [1, T], using a DynamicCache."""
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise FactorlmError(f"generate_tokens takes one prompt of shape [1, T], got {tuple(input_ids.shape)}")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = input_ids.shape[1]
    device = next(model.parameters()).device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    stop_ids = set() if params.ignore_eos else set(stop_ids or ()) | set(params.stop_token_ids or ())
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    # logits_to_keep=1: the prompt's other positions need no vocabulary projection
    logits = model(input_ids=input_ids.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    for step in range(params.max_new_tokens):
        token = sample_next(logits, params, generator)
        token_id = int(token.item())
        now = time.perf_counter()
        if step == 0:
            stats.ttft_s = now - start
            decode_start = now
        stats.new_tokens = step + 1
        stats.decode_s = now - decode_start
        if token_id in stop_ids:
            stats.finish_reason = "stop"
            return
        yield token_id
        if step + 1 == params.max_new_tokens:
            break
        logits = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True).logits[:, -1]
    stats.finish_reason = "length"


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = False, system: str | None = None) -> torch.Tensor:
    """Token ids [1, T] of a plain prompt or of a chat turn rendered with the tokenizer's template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise FactorlmError("this tokenizer has no chat template; drop --chat to send a plain prompt")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise FactorlmError("the prompt encodes to zero tokens")
    return ids


def stream_text(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor,
    params: SamplingParams,
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Yield decoded text pieces; stops at EOS or before the first stop string (not emitted)."""
    stats = stats if stats is not None else GenerationStats()
    tokens: list[int] = []
    emitted = 0
    hold = max((len(s) for s in params.stop), default=0)
    for token_id in generate_tokens(model, input_ids, params, eos_token_ids(model, tokenizer), stats):
        tokens.append(token_id)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # an incomplete UTF-8 sequence: wait for the next token
        cut = find_stop(text, params.stop)
        if cut >= 0:
            if cut > emitted:
                yield text[emitted:cut]
            stats.finish_reason = "stop"
            return
        safe = len(text) - hold  # keep back what could still become a stop string
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if len(text) > emitted:
        yield text[emitted:]
