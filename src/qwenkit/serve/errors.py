"""API errors: one exception type, one body shape per wire API, and the handlers that make every failure one.

Contract: raise APIError(status, message, ...) anywhere in the server; the client gets {"error": {"message",
"type", "param", "code"}} with that status (under /v1/messages Anthropic's {"type": "error", "error":
{"type", "message"}}, under /api/ Ollama's {"error": message}, see wire_of), the message cut to
MAX_MESSAGE_CHARS (a message never echoes a huge input back). Engine errors map to statuses here (overloaded
→ 503 with Retry-After, too long → 400 context_length_exceeded). Unexpected exceptions become a bare 500;
the traceback goes to the server log only. `reason` labels the rejected-requests metric. header_safe() is
the one way client text gets into a response header: printable ASCII only, so h11 never refuses (or is
injected by) it.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from qwenkit.engines.request import EngineError, EngineOverloaded, GrammarError, RequestTooLong
from qwenkit.serve.logs import request_info

MAX_MESSAGE_CHARS = 300
MAX_HEADER_CHARS = 500
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
RETRY_AFTER_OVERLOADED_S = 1

_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}
_REASON_BY_STATUS = {
    401: "auth",
    404: "not_found",
    405: "not_found",
    413: "body_too_large",
    415: "content_type",
    429: "rate_limit",
    503: "overloaded",
}

# Anthropic's error types (https://docs.anthropic.com/en/api/errors); other 4xx are invalid_request_error.
_ANTHROPIC_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
ANTHROPIC_PREFIX = "/v1/messages"
Wire = Literal["openai", "anthropic", "ollama"]

log = logging.getLogger("qwenkit.serve")


def wire_of(path: str) -> Wire:
    """The error shape a path answers in: Anthropic's under /v1/messages, Ollama's under /api/, OpenAI's
    everywhere else."""
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return "anthropic"
    return "ollama" if path.startswith("/api/") else "openai"


def short(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """One line of at most `limit` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def header_safe(text: str, limit: int = MAX_HEADER_CHARS) -> str:
    """Client text as a header value: whitespace runs become one space (so no CR/LF), every character
    outside printable ASCII is escaped (\\xNN, \\uNNNN), no space at either end, at most `limit` chars.
    May be "": leave such a header out."""
    line = _NOT_PRINTABLE_ASCII.sub(_escape, " ".join(str(text).split()))
    if len(line) > limit:
        line = line[: limit - 3].rstrip() + "..."
    return line


class APIError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = short(message)
        self.type = type or _TYPE_BY_STATUS.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.param = None if param is None else short(param, 80)
        self.code = code
        self.reason = reason or _REASON_BY_STATUS.get(status, "invalid" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self, wire: Wire = "openai") -> dict[str, Any]:
        """The error body in `wire`'s shape (see wire_of)."""
        if wire == "anthropic":
            kind = _ANTHROPIC_TYPE_BY_STATUS.get(
                self.status, "api_error" if self.status >= 500 else "invalid_request_error"
            )
            return {"type": "error", "error": {"type": kind, "message": self.message}}
        if wire == "ollama":
            return {"error": self.message}
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, wire: Wire = "openai") -> JSONResponse:
        return JSONResponse(self.body(wire), status_code=self.status, headers=self.headers)

    async def send(self, send: Send, wire: Wire = "openai") -> None:
        """Answer at the ASGI level (for middleware, before any route runs)."""
        payload = json.dumps(self.body(wire)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def from_engine_error(exc: EngineError) -> APIError:
    """The HTTP answer to an error the engine raised when a request was submitted."""
    if isinstance(exc, EngineOverloaded):
        return APIError(
            503,
            str(exc),
            code="server_overloaded",
            reason="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_OVERLOADED_S)},
        )
    if isinstance(exc, RequestTooLong):
        return APIError(400, str(exc), code="context_length_exceeded", param="messages", reason="too_long")
    if isinstance(exc, GrammarError):
        return APIError(400, str(exc), param="response_format", code="invalid_schema")
    return APIError(400, str(exc))


def shutting_down() -> APIError:
    return APIError(
        503,
        "the server is shutting down; retry on another instance",
        code="shutting_down",
        reason="shutting_down",
        headers={"Retry-After": str(RETRY_AFTER_OVERLOADED_S)},
    )


def install_handlers(app: FastAPI) -> None:
    """Every exception a route can raise becomes an OpenAI error body."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        _remember(request, exc)
        return exc.response(wire_of(request.url.path))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            err = APIError(404, f"no route {request.url.path[:100]!r}; see GET /v1/models", code="not_found")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed here", code="method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail))
        _remember(request, err)
        return err.response(wire_of(request.url.path))

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        err = APIError(400, "invalid request")
        _remember(request, err)
        return err.response(wire_of(request.url.path))

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error in %s", request.url.path, exc_info=exc)
        err = APIError(500, "internal server error; the server log has the details", code="internal_error")
        _remember(request, err)
        return err.response(wire_of(request.url.path))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def _remember(request: Request, err: APIError) -> None:
    # The access log and the rejected-requests metric read the outcome from the request's scope.
    info = request_info(request.scope)
    if info is not None:
        info.rejected = err.reason
        info.error_type = err.type
