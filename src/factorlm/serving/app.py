"""The OpenAI-compatible HTTP app (FastAPI): a thin router over :mod:`factorlm.serving.handlers`.

Routes: GET /health, GET /metrics, GET /v1/models, POST /v1/completions, POST
/v1/chat/completions. Every error is OpenAI's error object with a 4xx status for bad input.
The whole app sits inside :class:`~factorlm.serving.middleware.ServerGuard`, which counts
every response in /metrics, checks the API key on /v1/* (health and metrics stay public,
as in vLLM), bounds the body in size and time, and answers crashes with a counted 500.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import APIError
from .handlers import OpenAIServing, error_response
from .limits import HttpLimits
from .metrics import ServerMetrics
from .middleware import ServerGuard
from .protocol import ChatCompletionRequest, CompletionRequest
from .tokenize import TokenizerPool


def create_app(engine: Any, *, api_key: str | None = None, max_tokens_limit: int | None = None,
               limits: HttpLimits | None = None, tokenizer_threads: int = 2, length_guard: bool = True) -> FastAPI:
    """The app for ``engine``; the engine is started on startup and stopped on shutdown.

    ``limits`` bound bodies here and, through ``app.state.limits``, headers and keep-alive in
    :func:`~factorlm.serving.server.uvicorn_server`.

    ``length_guard=False`` tokenizes every prompt, even one that cannot fit the context
    (see :class:`~factorlm.serving.tokenize.PromptEncoder`; benchmarks use it).
    """
    metrics = ServerMetrics(engine)
    pool = TokenizerPool(tokenizer_threads)
    serving = OpenAIServing(engine, metrics, pool, max_tokens_limit=max_tokens_limit, length_guard=length_guard)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.shutdown()
        pool.shutdown()

    app = FastAPI(title="factorlm", version="1", lifespan=lifespan)
    limits = limits or HttpLimits()
    app.state.engine, app.state.metrics, app.state.serving, app.state.limits = engine, metrics, serving, limits
    app.add_middleware(ServerGuard, metrics=metrics, api_key=api_key, limits=limits)
    add_error_handlers(app)
    app.include_router(build_router(serving))
    return app


def build_router(serving: OpenAIServing) -> APIRouter:
    """One route per endpoint, each a one-line call into the handlers."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        return serving.health()

    @router.get("/metrics")
    async def prometheus() -> Response:
        return serving.prometheus()

    @router.get("/v1/models")
    async def models() -> Response:
        return serving.models()

    @router.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await serving.completions(req, request)

    @router.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(req, request)

    return router


def add_error_handlers(app: FastAPI) -> None:
    """APIError, request validation and routing errors as OpenAI error objects."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail)))


def _field_path(loc: Any) -> list[str]:
    """The field names of a pydantic error location, without "body" and union-branch tags like ``list[int]``."""
    return [str(x) for x in loc if x != "body" and not (isinstance(x, str) and ("[" in x or x in ("str", "int")))]


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """One 400 for pydantic's errors: our own value checks (e.g. invalid Unicode) first, the field named."""
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
    own = [e for e in errors if e.get("type") == "value_error"]
    shown = own or errors
    parts = []
    for e in shown[:5]:
        where = ".".join(_field_path(e.get("loc", ()))) or "body"
        parts.append(f"{where}: {str(e.get('msg', '')).removeprefix('Value error, ')}")
    path = _field_path(shown[0].get("loc", ()))
    return APIError(400, "; ".join(dict.fromkeys(parts)), path[0] if path else None)
