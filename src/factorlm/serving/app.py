"""The OpenAI-compatible HTTP app (FastAPI) over an :class:`~factorlm.serving.engine.Engine`.

Routes: GET /health, GET /metrics, GET /v1/models, POST /v1/completions, POST
/v1/chat/completions. Every error is OpenAI's error object with a 4xx status for bad input;
an API key, when set, guards /v1/* (health and metrics stay public, as in vLLM).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runtime.format import FactorlmError
from . import openai_format as fmt
from .engine import EngineDeadError, QueueFullError, RequestHandle
from .metrics import ServerMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, unsupported
from .streaming import stream_events

log = logging.getLogger(__name__)
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
MAX_BODY_BYTES = 4 * 1024 * 1024


def _json(status: int, body: Any) -> JSONResponse:
    return JSONResponse(body, status_code=status)


class _Guard:
    """ASGI middleware: body-size limit, API key on /v1/*, and per-route request/error counts."""

    def __init__(self, app: Any, api_key: str | None, metrics: ServerMetrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "other"
        headers = dict(scope.get("headers") or [])

        async def counted_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                self.metrics.requests.labels(route=route, status=str(status)).inc()
                if status >= 400:
                    self.metrics.record_error(route, status, fmt.APIError(status, "").type)
            await send(message)

        error: fmt.APIError | None = None
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            error = fmt.APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        elif self.api_key and path.startswith("/v1/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                error = fmt.APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')")
        if error is not None:
            return await _json(error.status, error.body())(scope, receive, counted_send)
        await self.app(scope, receive, counted_send)


def create_app(engine: Any, *, api_key: str | None = None, max_tokens_limit: int | None = None,
               model_root: str | None = None) -> FastAPI:
    """The app for ``engine``; the engine is started on startup and stopped on shutdown."""
    metrics = ServerMetrics(engine)

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="factorlm", version="1", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(_Guard, api_key=api_key, metrics=metrics)

    @app.exception_handler(fmt.APIError)
    async def _api_error(request: Request, exc: fmt.APIError) -> JSONResponse:
        return _json(exc.status, exc.body())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
        else:
            message = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: "
                                f"{e.get('msg')}" for e in errors[:5])
        param = None if first.get("type") == "json_invalid" or not loc else loc[0]
        return _json(400, fmt.APIError(400, message, param).body())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _json(exc.status_code, fmt.APIError(exc.status_code, str(exc.detail)).body())

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _json(500, fmt.APIError(500, f"internal error: {type(exc).__name__}").body())

    @app.get("/health")
    async def health() -> Response:
        if not engine.alive():
            return _json(503, fmt.APIError(503, "the engine is not running").body())
        return _json(200, {"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {"id": engine.model_name, "object": "model", "created": fmt.now(), "owned_by": "factorlm",
                "root": model_root or engine.model_name, "parent": None, "max_model_len": engine.max_model_len}
        return _json(200, {"object": "list", "data": [card]})

    def check_common(req: CompletionRequest | ChatCompletionRequest) -> None:
        if req.model != engine.model_name:
            raise fmt.APIError(404, f"The model `{req.model}` does not exist.", "model", "model_not_found")
        bad = unsupported(req)
        if bad is not None:
            raise fmt.APIError(400, f"parameter {bad!r} is not supported by this server", bad)
        if req.stream_options is not None and not req.stream:
            raise fmt.APIError(400, "Stream options can only be defined when `stream=True`.", "stream_options")

    def submit(reqs: list[Any]) -> list[RequestHandle]:
        handles: list[RequestHandle] = []
        try:
            for r in reqs:
                handles.append(engine.submit(r))
        except (QueueFullError, EngineDeadError, FactorlmError) as exc:
            for h in handles:
                h.cancel()
            status = 429 if isinstance(exc, QueueFullError) else 503 if isinstance(exc, EngineDeadError) else 400
            raise fmt.APIError(status, str(exc)) from exc
        return handles

    async def run(request: Request, kind: str, handles: list[RequestHandle], prompt_tokens: int,
                  include_usage: bool, stream: bool, build: Any) -> Response:
        started = time.perf_counter()
        metrics.prompt_tokens.inc(prompt_tokens)
        rid, created = fmt.new_id("chatcmpl" if kind == "chat" else "cmpl"), fmt.now()
        if stream:
            body = stream_events(handles, kind, rid, created, engine.model_name, prompt_tokens, include_usage,
                                 metrics, started)
            return _SSEResponse(body, media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = await _collect(request, handles, metrics, started)
        if choices is None:
            return Response(status_code=499)  # the client went away; nobody reads this
        return _json(200, build(rid, created, choices, prompt_tokens))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        check_common(req)
        prompts = fmt.tokenize_prompts(req, engine.tokenizer)
        new = [fmt.resolve_max_tokens(req.max_tokens, 16, len(p), engine.max_model_len, max_tokens_limit,
                                      "max_tokens") for p in prompts]
        if req.logprobs is not None and not engine.supports_logprobs:
            raise fmt.APIError(400, "this engine does not return logprobs", "logprobs")
        handles = submit(fmt.engine_requests(req, prompts, new, req.logprobs))

        def build(rid: str, created: int, choices: list[fmt.Choice], prompt_tokens: int) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": engine.model_name,
                    "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                                 "stop_reason": c.stop_reason,
                                 "logprobs": fmt.completion_logprobs(c.logprobs) if req.logprobs is not None else None}
                                for i, c in enumerate(choices)],
                    "usage": fmt.usage(prompt_tokens, sum(c.completion_tokens for c in choices))}

        include = bool(req.stream_options and req.stream_options.include_usage)
        return await run(request, "completion", handles, sum(len(p) for p in prompts), include, bool(req.stream),
                         build)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise fmt.APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
        if req.logprobs and not engine.supports_logprobs:
            raise fmt.APIError(400, "this engine does not return logprobs", "logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise fmt.APIError(400, "set max_completion_tokens or max_tokens, not both", "max_completion_tokens")
        ids = fmt.tokenize_chat(req, engine.tokenizer)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        new = fmt.resolve_max_tokens(req.max_completion_tokens or req.max_tokens, None, len(ids),
                                     engine.max_model_len, max_tokens_limit, param)
        top = (req.top_logprobs or 0) if req.logprobs else None
        handles = submit(fmt.engine_requests(req, [ids], [new], top))

        def build(rid: str, created: int, choices: list[fmt.Choice], prompt_tokens: int) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion", "created": created, "model": engine.model_name,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                                 "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                 "logprobs": fmt.chat_logprobs(c.logprobs) if req.logprobs else None}
                                for i, c in enumerate(choices)],
                    "usage": fmt.usage(prompt_tokens, sum(c.completion_tokens for c in choices))}

        include = bool(req.stream_options and req.stream_options.include_usage)
        return await run(request, "chat", handles, len(ids), include, bool(req.stream), build)

    return app


async def _collect(request: Request, handles: list[RequestHandle], metrics: ServerMetrics,
                   started: float) -> list[fmt.Choice] | None:
    """Gather every choice of a non-streamed request; None (and the handles cancelled) if the client leaves."""
    choices = [fmt.Choice() for _ in handles]

    async def consume(i: int, handle: RequestHandle) -> None:
        last = started
        async for event in handle:
            if event.error is not None:
                raise fmt.APIError(500, event.error)
            if event.token_ids:
                t = time.perf_counter()
                (metrics.ttft if last == started else metrics.itl).observe(t - last)
                last = t
            choices[i].add(event)
        record_finish(metrics, choices[i], started)

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


def record_finish(metrics: ServerMetrics, choice: fmt.Choice, started: float) -> None:
    metrics.e2e.observe(time.perf_counter() - started)
    metrics.success.labels(finished_reason=choice.finish_reason or "unknown").inc()
    metrics.generation_tokens.inc(choice.completion_tokens)


class _SSEResponse(StreamingResponse):
    """A streaming response that stops its body (and so cancels generation) as soon as the client disconnects."""

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
