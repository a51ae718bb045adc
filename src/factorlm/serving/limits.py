"""HTTP limits of the server: body size, read timeouts, header size, keep-alive.

One frozen value object shared by the ASGI layer (body size and body timeout, enforced in
:mod:`factorlm.serving.middleware`) and the uvicorn configuration (header size, header
timeout and keep-alive, in :mod:`factorlm.serving.server`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime.format import FactorlmError

MIB = 1024 * 1024


@dataclass(frozen=True)
class HttpLimits:
    """Bounds on what one connection may cost the server."""

    max_body_bytes: int = 4 * MIB  # larger bodies (announced or chunked) get 413
    body_timeout_s: float = 30.0  # the whole body must arrive within this, else 408 and the connection closes
    header_timeout_s: float = 10.0  # request line + headers must arrive within this after connect / the last response
    keep_alive_timeout_s: float = 5.0  # idle keep-alive connections close after this
    max_header_bytes: int = 64 * 1024  # request line + headers larger than this get 400 from the HTTP parser
    drain_s: float = 1.0  # after a 413, read (and drop) the rest of the body this long so the client sees the answer

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise FactorlmError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("body_timeout_s", "header_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise FactorlmError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.drain_s < 0:
            raise FactorlmError(f"drain_s must be >= 0 seconds, got {self.drain_s}")
