"""The engine protocol the HTTP layer talks to, and the request/event types it exchanges.

An engine accepts tokenized requests, streams :class:`TokenEvent` objects back to an
asyncio consumer and can cancel a request at any time. Engines run their compute on a
worker thread; the HTTP layer never blocks on the model.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..runtime.format import FactorlmError
from ..runtime.generate import SamplingParams


class QueueFullError(FactorlmError):
    """The engine's waiting queue is full; the client should retry later (HTTP 429)."""


class EngineDeadError(FactorlmError):
    """The engine's worker stopped; no request can be served (HTTP 503)."""


class NeverFitsError(FactorlmError):
    """A request no idle engine could take (more sequences than ``max_batch``, longer than the context): HTTP 400."""


@dataclass
class TokenLogprob:
    """Log-probability of one generated token and of the ``top`` most likely alternatives."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class GenerationRequest:
    """A tokenized prompt plus sampling parameters; ``logprobs`` is the number of alternatives (None = off)."""

    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None


@dataclass
class TokenEvent:
    """A piece of output: new text, the tokens that produced it, and ``finish_reason`` on the last event."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


_ids = itertools.count()


class RequestHandle:
    """The consumer side of one request: ``async for event in handle`` until an event has a finish_reason."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.id = next(_ids)
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.cancelled = False
        self.finished = False

    def push(self, event: TokenEvent) -> None:
        """Deliver an event from the worker thread (thread-safe); dropped if the loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            self.cancelled = True  # the event loop is closed: nobody is listening any more

    def cancel(self) -> None:
        """Ask the engine to stop this request and free its slot at the next step."""
        self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self.queue.get()
            yield event
            if event.finish_reason is not None or event.error is not None:
                self.finished = True
                return


class Engine(Protocol):
    """What the server needs from a generation backend."""

    model_name: str
    max_model_len: int
    max_batch: int
    tokenizer: Any
    supports_logprobs: bool

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request; raises QueueFullError when the waiting queue is full. Call from the event loop."""

    def submit_many(self, requests: list[GenerationRequest]) -> list[RequestHandle]:
        """Queue all of ``requests`` or none: NeverFitsError if they could never run together,
        QueueFullError if they do not fit the queue now. Call from the event loop."""

    def stats(self) -> dict[str, int]:
        """Counters for /metrics: ``running``, ``waiting``, ``max_batch``, ``max_queue``."""

    def alive(self) -> bool:
        """False once the worker has died."""

    def start(self) -> None:
        """Start the worker thread."""

    def shutdown(self) -> None:
        """Stop the worker and fail pending requests."""
