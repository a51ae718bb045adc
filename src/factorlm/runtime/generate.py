"""Generation for ``factorlm generate`` and Python callers: one prompt, streamed, with stop strings.

Thin front over :mod:`factorlm.runtime.decode` (the sampler, the text stream, the decode
loop and its cache policies); the names below stay importable from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .decode import (CausalLM, GenerationStats, SamplingParams, TextStream, decode_tokens, eos_token_ids,
                     filter_logits, find_stop, sample_next, torch_lm)
from .format import FactorlmError

__all__ = ["GenerationStats", "SamplingParams", "encode_prompt", "eos_token_ids", "filter_logits", "find_stop",
           "generate_tokens", "sample_next", "stream_lm_text", "stream_text"]


def generate_tokens(model: Any, input_ids: torch.Tensor, params: SamplingParams, stop_ids: set[int] | None = None,
                    stats: GenerationStats | None = None, *, compile: bool = False) -> Iterator[int]:
    """Yield new token ids for a single prompt ``input_ids`` [1, T] of a transformers model.

    ``compile=False``: a DynamicCache, eager; ``compile=True``: a static cache sized to this
    request with the decode step compiled.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise FactorlmError(f"generate_tokens takes one prompt of shape [1, T], got {tuple(input_ids.shape)}")
    lm = torch_lm(model, compile=compile, max_cache_len=input_ids.shape[1] + params.max_new_tokens + 1)
    return decode_tokens(lm, input_ids, params, stop_ids, stats)


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


def stream_lm_text(lm: CausalLM, tokenizer: Any, input_ids: torch.Tensor, params: SamplingParams,
                   eos: set[int], stats: GenerationStats | None = None) -> Iterator[str]:
    """Decoded text pieces of any ``CausalLM``; stops at EOS or before the first stop string (not emitted)."""
    stats = stats if stats is not None else GenerationStats()
    stream = TextStream(tokenizer, params.stop)
    for token_id in decode_tokens(lm, input_ids, params, eos, stats):
        piece = stream.push(token_id)
        if piece:
            yield piece
        if stream.stop_string is not None:
            stats.finish_reason = "stop"
            return
    rest = stream.flush()
    if rest:
        yield rest


def stream_text(model: Any, tokenizer: Any, input_ids: torch.Tensor, params: SamplingParams,
                stats: GenerationStats | None = None, *, compile: bool = False) -> Iterator[str]:
    """Yield decoded text pieces of a transformers model (see :func:`stream_lm_text`)."""
    lm = torch_lm(model, compile=compile, max_cache_len=input_ids.shape[1] + params.max_new_tokens + 1)
    return stream_lm_text(lm, tokenizer, input_ids, params, eos_token_ids(model, tokenizer), stats)
