"""The outermost ASGI layer of the server: every request and every response passes here.

:class:`ServerGuard` wraps the whole FastAPI app, so that what it does holds for every
route, error handler and crash alike:

- counts each response in ``/metrics`` by route and status (4xx and 5xx in
  ``factorlm:request_errors``), including 500s from unexpected exceptions, which it turns
  into OpenAI error objects itself;
- checks the API key on ``/v1/*`` before reading any body;
- reads the body itself, counting bytes as they arrive, so an announced or a chunked
  body above the limit gets 413, and a body that does not arrive in time gets 408 (both
  close the connection); the app then reads the buffered body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import APIError, error_type
from .limits import HttpLimits
from .metrics import ServerMetrics

log = logging.getLogger(__name__)
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def send_error(error: APIError, send: Send, *, close: bool = False) -> None:
    """Answer ``error`` as an OpenAI error object (raw ASGI), optionally closing the connection after it."""
    body = json.dumps(error.body()).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive callable that yields the buffered ``body`` once, then waits on the connection (disconnects)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return receive_again


class ServerGuard:
    """ASGI middleware: metrics for every response, API key, body limit and body timeout, 500s for crashes."""

    def __init__(self, app: Any, *, metrics: ServerMetrics, api_key: str | None, limits: HttpLimits) -> None:
        self.app, self.metrics, self.api_key, self.limits = app, metrics, api_key, limits

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        started = False

        async def counted_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.count(route, int(message["status"]))
            await send(message)

        try:
            error = self.check_headers(scope)
            if error is not None:
                return await send_error(error, counted_send, close=error.status != 401)
            body, error = await self.read_body(receive)
            if error is not None:
                return await send_error(error, counted_send, close=True)
            if body is None:
                return  # the client left before sending its body
            await self.app(scope, replay(body, receive), counted_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope["path"])
            if not started:
                await send_error(APIError(500, "internal server error"), counted_send)
            else:  # the status line is gone: count the failure, and let the server close the connection
                self.metrics.record_error(route, 500, "server_error")

    def count(self, route: str, status: int) -> None:
        self.metrics.requests.labels(route=route, status=str(status)).inc()
        if status >= 400:
            self.metrics.record_error(route, status, error_type(status))

    def check_headers(self, scope: dict[str, Any]) -> APIError | None:
        """401 for a missing or wrong API key on /v1/*, 413 for an announced body above the limit."""
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')")
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return APIError(400, "invalid Content-Length header")
        if length is not None and int(length) > self.limits.max_body_bytes:
            return self.too_large()
        return None

    def too_large(self) -> APIError:
        return APIError(413, f"request body larger than {self.limits.max_body_bytes} bytes")

    async def read_body(self, receive: Receive) -> tuple[bytes | None, APIError | None]:
        """The whole body, counted as it arrives; (None, error) past the size or time limit; (None, None) on disconnect."""
        chunks: list[bytes] = []
        size, limit = 0, self.limits.max_body_bytes
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None, None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        await self.drain(receive)
                        return None, self.too_large()
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks), None
        except TimeoutError:
            return None, APIError(408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s "
                                  f"({size} bytes received)")

    async def drain(self, receive: Receive) -> None:
        """Read and drop the rest of an oversize body for a short while, so that the client reads the 413
        instead of a reset connection; after that the connection is closed whatever is left."""
        deadline = time.monotonic() + self.limits.drain_s
        dropped, cap = 0, 4 * self.limits.max_body_bytes
        try:
            async with asyncio.timeout(self.limits.drain_s):
                while time.monotonic() < deadline and dropped < cap:
                    message = await receive()
                    dropped += len(message.get("body", b""))
                    if message["type"] == "http.disconnect" or not message.get("more_body", False):
                        return
        except TimeoutError:
            return
