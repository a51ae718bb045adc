"""Server-sent events for streamed completions and chat completions (OpenAI chunk format)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from . import openai_format as fmt
from .engine import RequestHandle, TokenEvent
from .metrics import ServerMetrics


def sse(data: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def chunk(kind: str, rid: str, created: int, model: str, index: int, event: TokenEvent, first: bool,
          logprobs: bool) -> dict[str, Any]:
    """The chunk that carries one event of choice ``index``."""
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": event.text} if first else {"content": event.text}
        lp = fmt.chat_logprobs(event.logprobs) if logprobs else None
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": event.finish_reason}
        obj = "chat.completion.chunk"
    else:
        lp = fmt.completion_logprobs(event.logprobs) if logprobs else None
        choice = {"index": index, "text": event.text, "logprobs": lp, "finish_reason": event.finish_reason}
        obj = "text_completion"
    if event.finish_reason is not None:
        choice["stop_reason"] = event.stop_reason
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": None}


async def stream_events(handles: list[RequestHandle], kind: str, rid: str, created: int, model: str,
                        prompt_tokens: int, include_usage: bool, metrics: ServerMetrics,
                        started: float) -> AsyncIterator[str]:
    """Interleave the events of all choices as SSE chunks; cancel every choice if the stream is closed early."""
    from .app import record_finish

    queue: asyncio.Queue[tuple[int, TokenEvent | None]] = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        try:
            async for event in handle:
                await queue.put((i, event))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    choices = [fmt.Choice() for _ in handles]
    last = [started] * len(handles)
    remaining = len(handles)
    sent = [False] * len(handles)
    want_logprobs = any(h.request.logprobs is not None for h in handles)
    try:
        while remaining:
            i, event = await queue.get()
            if event is None:
                remaining -= 1
                continue
            if event.error is not None:
                metrics.record_error("stream", 500, "server_error")
                yield sse(fmt.APIError(500, event.error).body())
                break
            if event.token_ids:
                t = time.perf_counter()
                (metrics.ttft if last[i] == started else metrics.itl).observe(t - last[i])
                last[i] = t
            choices[i].add(event)
            if event.text or event.finish_reason is not None:
                yield sse(chunk(kind, rid, created, model, i, event, not sent[i], want_logprobs))
                sent[i] = True
            if event.finish_reason is not None:
                record_finish(metrics, choices[i], started)
        else:
            if include_usage:
                total = sum(c.completion_tokens for c in choices)
                yield sse({"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                           "created": created, "model": model, "choices": [],
                           "usage": fmt.usage(prompt_tokens, total)})
        yield "data: [DONE]\n\n"
    finally:
        for h in handles:
            if not h.finished:
                h.cancel()
        for t in tasks:
            t.cancel()
