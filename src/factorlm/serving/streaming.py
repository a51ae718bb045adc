"""Server-sent events for streamed completions and chat completions (OpenAI chunk format).

:func:`stream_events` turns the engine's events into SSE chunks; :class:`SSEResponse` sends
them and stops (so generation is cancelled) as soon as the client disconnects.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.responses import StreamingResponse

from . import openai_format as fmt
from .engine import RequestHandle, TokenEvent
from .errors import APIError
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
                yield sse(APIError(500, event.error).body())
                break
            if event.token_ids:
                last[i] = metrics.observe_token(started, last[i])
            choices[i].add(event)
            if event.text or event.finish_reason is not None:
                yield sse(chunk(kind, rid, created, model, i, event, not sent[i], want_logprobs))
                sent[i] = True
            if event.finish_reason is not None:
                metrics.record_finish(choices[i].finish_reason, choices[i].completion_tokens, started)
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


class SSEResponse(StreamingResponse):
    """A streaming response that stops its body (and so cancels generation) as soon as the client disconnects."""

    def __init__(self, body: AsyncIterator[str]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async with anyio.create_task_group() as group:
            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:
                    pass
                group.cancel_scope.cancel()

            async def listen() -> None:
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            group.start_soon(listen)
        aclose = getattr(self.body_iterator, "aclose", None)
        if aclose is not None:
            await aclose()
