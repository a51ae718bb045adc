"""Prompts to token ids, off the event loop, and a cheap length check before the long work.

Tokenizing a long prompt or rendering a chat template takes seconds for a request of a
few megabytes, so the HTTP layer never does it on the event loop: :class:`TokenizerPool`
runs these pure functions on a small pool of worker threads (fast tokenizers release the
GIL while they encode), and ``/health`` and running streams keep flowing meanwhile.

Most of that work is for prompts that cannot fit anyway: a 4 MB prompt is ~1M tokens and
takes ~10 s and ~700 MB to tokenize, for a context of a few thousand tokens.
:class:`PromptEncoder` refuses them first: when a tokenizer never drops text (checked from
its normalizer, pre-tokenizer and model), no token stands for more characters than its
longest vocabulary entry, so a text of C characters has at least C / that many tokens.
Tokenizers for which this does not hold (WordPiece, fused unknowns, whitespace-dropping
pre-tokenizers) get no guard and are simply tokenized.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import APIError
from .protocol import ChatCompletionRequest

log = logging.getLogger(__name__)
T = TypeVar("T")
Prompt = str | list[int]
_KEEPS_TEXT_NORMALIZERS = {"NFD", "NFKD", "Lowercase", "Prepend", "Replace"}  # never shrink text
_COMPOSING_NORMALIZERS = {"NFC", "NFKC"}  # may compose a few code points into one
_KEEPS_TEXT_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "Split", "UnicodeScripts"}
COMPOSE_SLACK = 4


def _parts(component: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    if component is None:
        return []
    return [p for c in component.get(key, []) for p in _parts(c, key)] if component["type"] == "Sequence" else [component]


def max_chars_per_token(tokenizer: Any) -> float | None:
    """An upper bound on the characters of text one token stands for, or None when no such bound holds."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
        normalizers = _parts(spec.get("normalizer"), "normalizers")
        pre = _parts(spec.get("pre_tokenizer"), "pretokenizers")
        model = spec["model"]
        longest = max(len(token) for token in backend.get_vocab(with_added_tokens=True))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if any(n["type"] not in _KEEPS_TEXT_NORMALIZERS | _COMPOSING_NORMALIZERS for n in normalizers):
        return None
    for n in normalizers:  # Replace may only swap a fixed string for one at least as long (" " -> "\u2581")
        pattern = n.get("pattern") or {}
        if n["type"] == "Replace" and not (isinstance(pattern.get("String"), str)
                                           and len(pattern["String"]) <= len(n.get("content") or "")):
            return None
    if any(t.get("lstrip") or t.get("rstrip") for t in spec.get("added_tokens") or []):
        return None  # such a token swallows any run of whitespace beside it
    if any(p["type"] not in _KEEPS_TEXT_PRE_TOKENIZERS or str(p.get("behavior", "")).lower() == "removed" for p in pre):
        return None
    fused_unknowns = model.get("fuse_unk") or (model["type"] == "Unigram" and not model.get("byte_fallback"))
    if model["type"] not in ("BPE", "Unigram") or fused_unknowns:
        return None
    slack = COMPOSE_SLACK if any(n["type"] in _COMPOSING_NORMALIZERS for n in normalizers) else 1
    return float(longest * slack)


PROBES = ("Hello, world! 123", " leading space\n\ttabs  and  spaces", "caf\u00e9 \u4e2d\u6587 \U0001f600")


def _same_ids_backend(tokenizer: Any) -> Any:
    """The fast tokenizer's Rust backend if it gives exactly ``tokenizer(text).input_ids`` on probe texts, else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    special = [t for t in (getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None)) if t]
    try:
        for text in (*PROBES, " ".join(special) + " x"):
            for add in (True, False):
                if tokenizer(text, add_special_tokens=add).input_ids != backend.encode_batch(
                        [text], add_special_tokens=add)[0].ids:
                    return None
    except Exception:  # any tokenizer that does not behave like a fast one takes the ordinary path
        return None
    return backend


class PromptEncoder:
    """Text to token ids for one tokenizer and context, refusing texts that cannot fit as early as possible.

    First the characters-per-token bound (no tokenizing at all), then the token count of
    the Rust encoding before its ids become a Python list (building a list of a million
    ids holds the GIL for a noticeable time). Either way the error is the same 400
    (``param: input_tokens``) that a merely too long prompt gets.
    """

    def __init__(self, tokenizer: Any, context: int, *, length_guard: bool = True) -> None:
        self.tokenizer, self.context = tokenizer, context
        self.chars_per_token = max_chars_per_token(tokenizer) if length_guard else None
        self.backend = _same_ids_backend(tokenizer)
        log.debug("prompt encoder: at most %s characters per token; Rust backend: %s", self.chars_per_token,
                  self.backend is not None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.chars_per_token is not None and len(text) >= self.context * self.chars_per_token:
            at_least = math.ceil(len(text) / self.chars_per_token)
            raise self.too_long(f"at least {at_least} input tokens ({len(text)} characters, at most "
                                f"{self.chars_per_token:g} per token)")
        if self.backend is None:
            return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        encoding = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        if len(encoding) >= self.context:
            raise self.too_long(f"{len(encoding)} input tokens")
        return encoding.ids

    def too_long(self, what: str) -> APIError:
        return APIError(400, f"This model's maximum context length is {self.context} tokens. However, your request "
                        f"has {what}, which leaves no room for output.", "input_tokens")


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


def tokenize_prompts(prompts: list[Prompt], encoder: PromptEncoder) -> list[list[int]]:
    """The token ids of each prompt (strings are tokenized, id lists range-checked)."""
    out: list[list[int]] = []
    vocab = len(encoder.tokenizer)
    for p in prompts:
        ids = encoder.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "prompt must not be empty", "prompt")
        if not isinstance(p, str) and any(i < 0 or i >= vocab for i in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        out.append(ids)
    return out


def tokenize_chat(req: ChatCompletionRequest, encoder: PromptEncoder) -> list[int]:
    """Token ids of the conversation rendered with the tokenizer's chat template."""
    tokenizer = encoder.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return encoder.encode(text, add_special_tokens=False)


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
