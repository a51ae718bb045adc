"""The one error type of the HTTP layer: OpenAI's error object with a status code.

Messages may quote client input (a model name, a field name). They are made safe to
encode here, once: a lone surrogate such as ``"\\ud800"`` becomes the six characters
``\\ud800``, so rendering an error never fails.
"""

from __future__ import annotations

from typing import Any


def safe_text(text: str) -> str:
    """``text`` with lone surrogates spelled out as ``\\udXXX`` escapes, so that it encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """An error answered with OpenAI's error object (``{"error": {message, type, param, code}}``)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        message = safe_text(message)
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.param = None if param is None else safe_text(param)
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        return self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_type(status: int) -> str:
    """The OpenAI error type of a status code (for metrics labels)."""
    return APIError(status, "").type
