"""Running the app under uvicorn with bounded connections, in the foreground or in a thread.

The HTTP/1.1 parser is h11 (not httptools), because h11 caps the size of the request line
and headers (``HttpLimits.max_header_bytes``; larger ones get 400). uvicorn closes idle
keep-alive connections but has no deadline for the headers of a new request, so the
protocol here adds one: a connection that has not sent a complete request head within
``header_timeout_s`` of connecting (or of its last response) is closed. Body size and
body time are bounded by the app's outermost layer (:mod:`factorlm.serving.middleware`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from ..runtime.format import FactorlmError
from .limits import HttpLimits

log = logging.getLogger(__name__)


def bounded_h11_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request head."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        head_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            if self.head_deadline is not None:
                self.head_deadline.cancel()
            if not self.transport.is_closing():
                self.head_deadline = self.loop.call_later(header_timeout_s, self._head_deadline, self.cycle)

        def _head_deadline(self, armed: Any) -> None:
            # no new request began since the deadline was armed (and none is being answered): close
            idle = armed is None or armed.response_complete
            if self.cycle is armed and idle and not self.transport.is_closing():
                log.debug("closing a connection that sent no complete request head in %.1f s", header_timeout_s)
                self.transport.close()

    return BoundedH11Protocol


def uvicorn_server(app: Any, host: str = "127.0.0.1", port: int = 8000, limits: HttpLimits | None = None) -> Any:
    """A uvicorn.Server for ``app`` (no access log: the metrics endpoint counts requests).

    ``limits`` default to the app's own (``app.state.limits``, set by ``create_app``).
    """
    import uvicorn

    limits = limits or getattr(getattr(app, "state", None), "limits", None) or HttpLimits()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, http=bounded_h11_protocol(limits.header_timeout_s),
                            h11_max_incomplete_event_size=limits.max_header_bytes,
                            timeout_keep_alive=limits.keep_alive_timeout_s)
    return uvicorn.Server(config)


class BackgroundServer:
    """Run an app on 127.0.0.1 in a thread (tests, benchmarks): ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, limits: HttpLimits | None = None) -> None:
        import socket

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn_server(app, host, port, limits)
        self.thread = threading.Thread(target=self.server.run, name="factorlm-uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise FactorlmError(f"the server at {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
