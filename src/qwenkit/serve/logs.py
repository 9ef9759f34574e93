"""One structured log line per request, and the per-request record the handlers fill in.

Contract: AccessMiddleware (outermost) gives every HTTP request a RequestInfo in its scope, adds an
x-request-id header, and when the response ends (or the client goes away) writes one JSON line to the
"qwenkit.serve.access" logger and counts the request in the metrics. The line has ids, sizes, timings and
status; prompt and completion text only when the server runs with log_content; user ids only as a keyed
hash (the key is per server, random, never logged).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwenkit.serve.metrics import ServeMetrics, route_label

SCOPE_KEY = "qwenkit.request"
access_log = logging.getLogger("qwenkit.serve.access")


@dataclass
class RequestInfo:
    """What one request did; handlers and middleware fill it in, the access log writes it."""

    id: str
    method: str
    route: str
    client: str | None
    key_id: str | None = None
    status: int | None = None
    user: str | None = None
    model: str | None = None
    stream: bool | None = None
    n: int | None = None
    body_bytes: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    ttft_ms: float | None = None
    duration_ms: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    rejected: str | None = None
    error_type: str | None = None
    disconnected: bool = False
    warnings: list[str] = field(default_factory=list)
    prompt: str | None = None  # only with log_content
    completion: list[str] | None = None  # only with log_content

    @property
    def rate_key(self) -> str:
        """Whose rate limits apply: the API key's id, else the client address."""
        return self.key_id or f"ip:{self.client or '?'}"

    def log_fields(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, [], False) or k == "status"}


def request_info(scope: Scope) -> RequestInfo | None:
    return scope.get(SCOPE_KEY)


class UserHasher:
    """Hashes end-user ids for logs with a random per-server key, so they cannot be guessed back."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def __call__(self, user: str) -> str:
        return "u-" + hmac.new(self._key, user.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:16]


def key_id(key: str) -> str:
    """A stable, non-secret name for an API key (keys are high-entropy, so a short hash reveals nothing)."""
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


class AccessMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        info = RequestInfo(
            id=uuid.uuid4().hex,
            method=scope["method"],
            route=route_label(scope["path"]),
            client=client[0] if client else None,
        )
        scope[SCOPE_KEY] = info
        start = time.perf_counter()
        done = False

        async def send_wrapper(message: Message) -> None:
            nonlocal done
            if message["type"] == "http.response.start":
                info.status = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", info.id.encode())],
                }
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            info.status, done = info.status or 500, True  # the outer error middleware answers 500
            raise
        finally:
            info.duration_ms = round((time.perf_counter() - start) * 1000, 2)
            if not done:
                info.disconnected = True
            self._record(info)

    def _record(self, info: RequestInfo) -> None:
        status = info.status or 500
        self.metrics.requests.labels(info.route, str(status)).inc()
        self.metrics.request_seconds.labels(info.route).observe((info.duration_ms or 0) / 1000)
        if info.rejected:
            self.metrics.rejected.labels(info.rejected).inc()
        for reason in info.finish_reasons:
            if reason in ("stop", "length", "tool_calls", "content_filter"):  # bounded label values
                self.metrics.finished.labels(reason).inc()
        access_log.info(json.dumps({"event": "request", **info.log_fields()}, ensure_ascii=False))
