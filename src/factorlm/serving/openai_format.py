"""Turning validated API requests into engine requests, and engine events into OpenAI JSON.

Pure functions of the request, the token ids and the collected events; no I/O here.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..runtime.generate import SamplingParams
from .engine import GenerationRequest, TokenEvent, TokenLogprob
from .errors import APIError
from .protocol import ChatCompletionRequest, CompletionRequest


SAMPLING_EPS = 1e-5


def resolve_max_tokens(requested: int | None, default: int | None, prompt_len: int, max_model_len: int,
                       limit: int | None, param: str) -> int:
    """How many tokens to generate; 400 when the prompt or the request does not fit the context."""
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, your request "
                       f"has {prompt_len} input tokens, which leaves no room for output.", "input_tokens")
    value = requested if requested is not None else (default if default is not None else room)
    if requested is None and limit is not None:
        value = min(value, limit)  # an omitted max_tokens means "as much as allowed"
    if limit is not None and value > limit:
        raise APIError(400, f"{param} must be <= {limit} on this server, got {value}", param)
    if requested is not None and prompt_len + value > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                       f"{prompt_len + value} tokens ({prompt_len} in the input, {value} for the completion).", param)
    return min(value, room)


def engine_requests(req: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]], max_tokens: list[int],
                    logprobs: int | None) -> list[GenerationRequest]:
    """One engine request per (prompt, choice), choice-major within each prompt."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    temperature = 1.0 if req.temperature is None else req.temperature
    if temperature < SAMPLING_EPS:  # as in vLLM: a vanishing temperature is greedy decoding
        temperature = 0.0
    n = req.n or 1
    out = []
    for ids, new in zip(prompts, max_tokens):
        for i in range(n):
            seed = None if req.seed is None else req.seed + i
            params = SamplingParams(
                max_new_tokens=new, temperature=temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=max(req.top_k or 0, 0), seed=seed, stop=stop,
                stop_token_ids=req.stop_token_ids, ignore_eos=bool(req.ignore_eos))
            out.append(GenerationRequest(ids, params, logprobs))
    return out


@dataclass
class Choice:
    """Everything collected for one choice."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    completion_tokens: int = 0

    def add(self, event: TokenEvent) -> None:
        self.text += event.text
        self.logprobs += event.logprobs
        self.completion_tokens = event.completion_tokens or self.completion_tokens
        if event.finish_reason is not None:
            self.finish_reason, self.stop_reason = event.finish_reason, event.stop_reason


def completion_logprobs(items: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    text_offset = []
    for item in items:
        text_offset.append(offset)
        offset += len(item.token)
    return {"tokens": [i.token for i in items], "token_logprobs": [i.logprob for i in items],
            "top_logprobs": [{tok: lp for _, tok, lp in i.top} for i in items], "text_offset": text_offset}


def chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, lp: float) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, lp) for _, t, lp in i.top]}
                        for i in items]}


def completion_body(rid: str, created: int, choices: list[Choice], prompt_tokens: int, *, model: str,
                    logprobs: bool) -> dict[str, Any]:
    """The JSON body of a non-streamed text completion."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                         "logprobs": completion_logprobs(c.logprobs) if logprobs else None}
                        for i, c in enumerate(choices)],
            "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices))}


def chat_body(rid: str, created: int, choices: list[Choice], prompt_tokens: int, *, model: str,
              logprobs: bool) -> dict[str, Any]:
    """The JSON body of a non-streamed chat completion."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                         "logprobs": chat_logprobs(c.logprobs) if logprobs else None}
                        for i, c in enumerate(choices)],
            "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices))}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
