"""Security at the door: API keys, rate limits and the body-size cap, as one pure ASGI middleware.

Contract: with keys configured, EVERY HTTP request needs `Authorization: Bearer <key>` except the exact
path "/health" — unknown paths, trailing slashes, double slashes, case and percent-encoding variants all
get 401 before any routing happens. Keys are compared in constant time against every configured key.
A client address that used up its wrong-key allowance (auth_failures_per_minute) gets 429 for its next
tries, whatever key they carry, until its bucket refills: guessing keys costs a minute per few dozen.
Then, except for /health and /metrics, a per-key (else per-client-address) token bucket admits requests
(requests/minute) and refuses clients in token debt (tokens/minute; handlers charge tokens as they are
used) with 429 + Retry-After. Finally the body is read here, at most max_body_bytes (413 beyond), and
replayed to the app, so no handler ever sees an oversized body.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwenkit.serve.errors import APIError
from qwenkit.serve.logs import key_id, request_info

PUBLIC_PATH = "/health"
UNLIMITED_PATHS = ("/health", "/metrics")
MAX_TRACKED_CLIENTS = 10_000


@dataclass
class _Bucket:
    level: float
    updated: float


class TokenBucket:
    """Buckets of one kind (capacity per minute), one per client, refilled continuously."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def _get(self, client: str) -> _Bucket:
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_CLIENTS:
                self._prune(now)
            bucket = self._buckets[client] = _Bucket(self.capacity, now)
        else:
            bucket.level = min(self.capacity, bucket.level + (now - bucket.updated) * self.rate)
            bucket.updated = now
        return bucket

    def _prune(self, now: float) -> None:
        # A bucket that has refilled is the same as no bucket: forget those (then the oldest, if need be).
        full = [
            c for c, b in self._buckets.items() if b.level + (now - b.updated) * self.rate >= self.capacity
        ]
        for client in full:
            del self._buckets[client]
        while len(self._buckets) >= MAX_TRACKED_CLIENTS:
            del self._buckets[next(iter(self._buckets))]

    def take(self, client: str, amount: float) -> float | None:
        """Take `amount` if the bucket holds it; else the seconds until it will."""
        wait = self.wait_for(client, amount)
        if wait is None:
            self._get(client).level -= amount
        return wait

    def wait_for(self, client: str, amount: float) -> float | None:
        """None if the bucket holds `amount` now (nothing is taken); else the seconds until it will."""
        bucket = self._get(client)
        return None if bucket.level >= amount else (amount - bucket.level) / self.rate

    def debt_wait(self, client: str) -> float | None:
        """Seconds until a client in debt (level below zero) is out of it; None when it is not."""
        bucket = self._get(client)
        return None if bucket.level >= 0 else -bucket.level / self.rate

    def charge(self, client: str, amount: float) -> None:
        """Take `amount` even if it puts the bucket in debt (tokens are counted after they are known)."""
        self._get(client).level -= amount


class RateLimiter:
    """Requests/minute and tokens/minute per client (either may be off: None), and wrong keys per address."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        auth_failures_per_minute: int = 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.requests = TokenBucket(rpm, clock) if rpm else None
        self.tokens = TokenBucket(tpm, clock) if tpm else None
        self.auth_failures = TokenBucket(auth_failures_per_minute, clock)

    def auth_lockout(self, address: str) -> float | None:
        """Seconds until an address that sent too many wrong keys may try again; None when it may now."""
        return self.auth_failures.wait_for(address, 1.0)

    def auth_failed(self, address: str) -> None:
        self.auth_failures.charge(address, 1.0)

    def admit(self, client: str) -> float | None:
        """None to admit the request (and count it), else the seconds to wait before retrying."""
        if self.tokens is not None:
            wait = self.tokens.debt_wait(client)
            if wait is not None:
                return wait
        if self.requests is not None:
            return self.requests.take(client, 1.0)
        return None

    def charge_tokens(self, client: str, tokens: int) -> None:
        if self.tokens is not None and tokens > 0:
            self.tokens.charge(client, tokens)


def _bearer(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    values = [v for k, v in headers if k.lower() == b"authorization"]
    if len(values) != 1:
        return None  # none, or ambiguous
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


class SecurityMiddleware:
    def __init__(
        self, app: ASGIApp, api_keys: Sequence[str], limiter: RateLimiter, max_body_bytes: int
    ) -> None:
        self.app = app
        self._keys = [(key_id(k), k.encode("utf-8")) for k in api_keys]
        self.limiter = limiter
        self.max_body_bytes = max_body_bytes

    def authenticate(self, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
        """The id of the key presented, or None. Every key is compared, in constant time, whatever matched."""
        token = _bearer(headers) or b""
        found = None
        for kid, key in self._keys:
            if hmac.compare_digest(token, key):
                found = kid
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self._keys:
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = request_info(scope)
        path = scope["path"]
        try:
            if self._keys and path != PUBLIC_PATH:
                address = f"ip:{info.client if info is not None else '?'}"
                locked = self.limiter.auth_lockout(address)
                if locked is not None:
                    what = "too many requests with a wrong API key from this address"
                    raise _too_many(what, "too_many_auth_failures", locked)
                kid = self.authenticate(scope["headers"])
                if kid is None:
                    self.limiter.auth_failed(address)
                    raise APIError(
                        401,
                        "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                        code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                if info is not None:
                    info.key_id = kid
            if path not in UNLIMITED_PATHS:
                rate_key = info.rate_key if info is not None else "?"
                wait = self.limiter.admit(rate_key)
                if wait is not None:
                    raise _too_many("rate limit reached", "rate_limit_exceeded", wait)
            body = await self._read_body(scope, receive)
        except APIError as err:
            if info is not None:
                info.rejected, info.error_type = err.reason, err.type
            await err.send(send)
            return
        if info is not None:
            info.body_bytes = len(body)
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        too_large = APIError(
            413, f"request body is larger than {self.max_body_bytes} bytes", code="request_too_large"
        )
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise APIError(400, "invalid Content-Length header") from None
                if declared > self.max_body_bytes:
                    raise too_large
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise APIError(400, "the client went away while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_many(what: str, code: str, wait: float) -> APIError:
    """429 with Retry-After: whole seconds, at least one."""
    return APIError(
        429,
        f"{what}; retry after the time in the Retry-After header",
        code=code,
        headers={"Retry-After": str(max(1, math.ceil(wait)))},
    )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then the real channel (to notice disconnects)."""
    sent = False

    async def wrapped() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped
