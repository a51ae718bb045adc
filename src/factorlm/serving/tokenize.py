"""Prompts to token ids, off the event loop.

Tokenizing a long prompt or rendering a chat template takes seconds for a request of a
few megabytes, so the HTTP layer never does it on the event loop: :class:`TokenizerPool`
runs these pure functions on a small pool of worker threads (fast tokenizers release the
GIL while they encode), and ``/health`` and running streams keep flowing meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import APIError
from .protocol import ChatCompletionRequest

T = TypeVar("T")
Prompt = str | list[int]


def split_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    """The prompts of a completions request: one string or id list, or a list of them."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt must not be empty", "prompt")
    return prompts


def tokenize_prompts(prompts: list[Prompt], tokenizer: Any) -> list[list[int]]:
    """The token ids of each prompt (strings are tokenized, id lists range-checked)."""
    out: list[list[int]] = []
    vocab = len(tokenizer)
    for p in prompts:
        ids = tokenizer(p).input_ids if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "prompt must not be empty", "prompt")
        if not isinstance(p, str) and any(i < 0 or i >= vocab for i in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        out.append(ids)
    return out


def tokenize_chat(req: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    """Token ids of the conversation rendered with the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


class TokenizerPool:
    """Runs tokenizer work on ``threads`` worker threads; ``await pool.run(fn, *args)``."""

    def __init__(self, threads: int = 2) -> None:
        if threads < 1:
            raise ValueError(f"tokenizer threads must be >= 1, got {threads}")
        self.threads = threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="factorlm-tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
