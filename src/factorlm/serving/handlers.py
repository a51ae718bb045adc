"""Request handlers of the OpenAI-compatible API: a validated request in, a response out.

This is the serving layer between the thin router (:mod:`factorlm.serving.app`) and the
engine, in the way vLLM splits its OpenAI server into protocol (schemas), serving (this)
and an API router. A handler checks what the engine can honour, tokenizes on the
:class:`~factorlm.serving.tokenize.TokenizerPool` (never on the event loop), submits all
sequences of the request at once and answers with a JSON body or a stream of events.

Status codes: 400 for a request that can never run here (bad field, too long for the
context, more sequences than ``max_batch``), 404 for an unknown model, 429 with
``Retry-After`` only when the queue is full right now, 503 when the engine has stopped.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..runtime.format import FactorlmError
from . import openai_format as fmt
from .engine import Engine, EngineDeadError, GenerationRequest, QueueFullError, RequestHandle
from .errors import APIError
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, unsupported
from .streaming import SSEResponse, stream_events
from .tokenize import PromptEncoder, TokenizerPool, split_prompts, tokenize_chat, tokenize_prompts

RETRY_AFTER_S = 1
Build = Callable[[str, int, list[fmt.Choice], int], dict[str, Any]]


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers or None)


class OpenAIServing:
    """The handlers of one server over ``engine``."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, pool: TokenizerPool, *,
                 max_tokens_limit: int | None = None, length_guard: bool = True) -> None:
        self.engine, self.metrics, self.pool, self.max_tokens_limit = engine, metrics, pool, max_tokens_limit
        self.encoder = PromptEncoder(engine.tokenizer, engine.max_model_len, length_guard=length_guard)

    # ---- GET ------------------------------------------------------------------------------------
    def health(self) -> JSONResponse:
        if not self.engine.alive():
            return error_response(APIError(503, "the engine is not running"))
        return JSONResponse({"status": "ok"})

    def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def models(self) -> JSONResponse:
        name = self.engine.model_name
        card = {"id": name, "object": "model", "created": fmt.now(), "owned_by": "factorlm", "root": name,
                "parent": None, "max_model_len": self.engine.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})

    # ---- POST -----------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self.check_common(req)
        if req.logprobs is not None and not self.engine.supports_logprobs:
            raise APIError(400, "this engine does not return logprobs", "logprobs")
        prompts = split_prompts(req.prompt)
        self.check_fits(req.n or 1, len(prompts))
        ids = await self.pool.run(tokenize_prompts, prompts, self.encoder)
        new = [fmt.resolve_max_tokens(req.max_tokens, 16, len(p), self.engine.max_model_len, self.max_tokens_limit,
                                      "max_tokens") for p in ids]
        handles = self.submit(fmt.engine_requests(req, ids, new, req.logprobs))
        build = functools.partial(fmt.completion_body, model=self.engine.model_name, logprobs=req.logprobs is not None)
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await self.respond(request, "completion", handles, sum(len(p) for p in ids), include,
                                  bool(req.stream), build)

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self.check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
        if req.logprobs and not self.engine.supports_logprobs:
            raise APIError(400, "this engine does not return logprobs", "logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise APIError(400, "set max_completion_tokens or max_tokens, not both", "max_completion_tokens")
        self.check_fits(req.n or 1, 1)
        ids = await self.pool.run(tokenize_chat, req, self.encoder)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        new = fmt.resolve_max_tokens(req.max_completion_tokens or req.max_tokens, None, len(ids),
                                     self.engine.max_model_len, self.max_tokens_limit, param)
        top = (req.top_logprobs or 0) if req.logprobs else None
        handles = self.submit(fmt.engine_requests(req, [ids], [new], top))
        build = functools.partial(fmt.chat_body, model=self.engine.model_name, logprobs=bool(req.logprobs))
        include = bool(req.stream_options and req.stream_options.include_usage)
        return await self.respond(request, "chat", handles, len(ids), include, bool(req.stream), build)

    # ---- shared steps ---------------------------------------------------------------------------
    def check_common(self, req: CompletionRequest | ChatCompletionRequest) -> None:
        if req.model != self.engine.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", "model", "model_not_found")
        bad = unsupported(req)
        if bad is not None:
            raise APIError(400, f"parameter {bad!r} is not supported by this server", bad)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "Stream options can only be defined when `stream=True`.", "stream_options")

    def check_fits(self, n: int, prompts: int) -> None:
        """400 (not 429) for a request with more sequences than the engine ever runs together."""
        limit = self.engine.max_batch
        if n * prompts > limit:
            raise APIError(400, f"this request asks for {n * prompts} sequences ({prompts} prompt(s) x n={n}), "
                           f"but this server runs at most {limit} together (--max-batch)", "n" if n > 1 else "prompt")

    def submit(self, requests: list[GenerationRequest]) -> list[RequestHandle]:
        try:
            return self.engine.submit_many(requests)
        except QueueFullError as exc:
            raise APIError(429, str(exc), headers={"Retry-After": str(RETRY_AFTER_S)}) from exc
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from exc
        except FactorlmError as exc:  # NeverFitsError and other bad input
            raise APIError(400, str(exc)) from exc

    async def respond(self, request: Request, kind: str, handles: list[RequestHandle], prompt_tokens: int,
                      include_usage: bool, stream: bool, build: Build) -> Response:
        started = time.perf_counter()
        self.metrics.prompt_tokens.inc(prompt_tokens)
        rid, created = fmt.new_id("chatcmpl" if kind == "chat" else "cmpl"), fmt.now()
        if stream:
            return SSEResponse(stream_events(handles, kind, rid, created, self.engine.model_name, prompt_tokens,
                                             include_usage, self.metrics, started))
        choices = await collect(request, handles, self.metrics, started)
        if choices is None:
            return Response(status_code=499)  # the client went away; nobody reads this
        return JSONResponse(build(rid, created, choices, prompt_tokens))


async def collect(request: Request, handles: list[RequestHandle], metrics: ServerMetrics,
                  started: float) -> list[fmt.Choice] | None:
    """Gather every choice of a non-streamed request; None (and the handles cancelled) if the client leaves."""
    choices = [fmt.Choice() for _ in handles]

    async def consume(i: int, handle: RequestHandle) -> None:
        last = started
        async for event in handle:
            if event.error is not None:
                raise APIError(500, event.error)
            if event.token_ids:
                last = metrics.observe_token(started, last)
            choices[i].add(event)
        metrics.record_finish(choices[i].finish_reason, choices[i].completion_tokens, started)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(asyncio.gather(*(consume(i, h) for i, h in enumerate(handles))))
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finished = work.done()
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
        for h in handles:
            if not h.finished:
                h.cancel()
    if not finished:
        return None
    work.result()  # re-raises an engine error as its APIError
    return choices
