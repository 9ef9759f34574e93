"""Security at the door: client address, CORS, API keys, rate limits, body cap and body timeout, as ASGI
middleware.

Contract: ClientAddressMiddleware (outermost) replaces the client address with the rightmost untrusted hop of
X-Forwarded-For, only when the direct peer is in trusted_proxies; that address feeds the lockout, the rate
limits and the access log. CORS (only with cors_origins) answers a preflight from an allowed origin before
the key check; any other preflight falls through to it. With keys configured, EVERY HTTP request needs
`Authorization: Bearer <key>` (under /v1/messages also `x-api-key: <key>`) except the exact paths in
PUBLIC_PATHS ("/health" and the web console's static page, whose API calls send the key) — unknown
paths, trailing slashes, double slashes, case and percent-encoding variants all get 401 before any routing
happens. Keys are compared in
constant time against every configured key. A valid key is never refused by the wrong-key lockout: a client
address that used up its wrong-key allowance (auth_failures_per_minute) gets 429 for its next wrong or
missing keys until its bucket refills. Then, except for /health and /metrics, a per-key (else per-address)
token bucket admits requests (requests/minute), and a client whose tokens of the last 60 s fill its
tokens/minute is refused; handlers reserve prompt + max_tokens per request at admission (reserve_tokens)
and settle to what was used when it ends, so the tokens charged in any 60 s stay within the limit (a request
larger than the whole limit runs alone, once nothing else was charged in the last 60 s). Refusals are 429 +
Retry-After. Finally the body is read here, at most max_body_bytes (a path in body_caps: its own cap; 413
beyond) within body_timeout seconds (408 beyond), and replayed to the app, so no handler ever sees an
oversized or half-sent body.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwenkit.serve.errors import APIError, wire_of
from qwenkit.serve.logs import key_id, request_info

# The console's files hold no data: the page asks for the key and sends it on every API call.
PUBLIC_PATHS = ("/health", "/", "/console/app.js", "/console/app.css")
UNLIMITED_PATHS = ("/health", "/metrics")
MAX_TRACKED_CLIENTS = 10_000
TOKEN_WINDOW_S = 60.0
MAX_CHARGES_PER_CLIENT = 256  # beyond, the oldest charges of a client are merged (never forgotten)
CORS_EXPOSED_HEADERS = ("x-request-id", "x-qwenkit-warning", "retry-after")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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

    def charge(self, client: str, amount: float) -> None:
        """Take `amount` even if it puts the bucket in debt."""
        self._get(client).level -= amount


@dataclass
class TokenCharge:
    """Tokens charged to a client at `time`; settle() corrects a reservation to what was really used."""

    time: float
    amount: int

    def settle(self, used: int) -> None:
        self.amount = max(0, used)


class TokenWindow:
    """Tokens charged per client in the last TOKEN_WINDOW_S seconds, each charge kept with its time: unlike
    a bucket (a full burst, then a full refill within the same minute) this bounds every 60 s window."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.limit = per_minute
        self._clock = clock
        self._charges: dict[str, deque[TokenCharge]] = {}

    def _live(self, client: str, now: float) -> deque[TokenCharge]:
        charges = self._charges.get(client)
        if charges is None:
            if len(self._charges) >= MAX_TRACKED_CLIENTS:
                self._prune(now)
            charges = self._charges[client] = deque()
        while charges and charges[0].time <= now - TOKEN_WINDOW_S:
            charges.popleft()
        return charges

    def _prune(self, now: float) -> None:
        # A client with nothing charged in the window is the same as no client (then the oldest, if need be).
        idle = [c for c, q in self._charges.items() if not q or q[-1].time <= now - TOKEN_WINDOW_S]
        for client in idle:
            del self._charges[client]
        while len(self._charges) >= MAX_TRACKED_CLIENTS:
            del self._charges[next(iter(self._charges))]

    def used(self, client: str) -> int:
        return sum(c.amount for c in self._live(client, self._clock()))

    def wait_for(self, client: str, amount: int) -> float | None:
        """None if `amount` fits in the client's window now; else the seconds until it will. An amount
        larger than the whole limit fits only into a window with nothing charged."""
        now = self._clock()
        charges = self._live(client, now)
        used = sum(c.amount for c in charges)
        room = self.limit - min(amount, self.limit)
        if used <= room:
            return None
        for charge in charges:  # oldest first: when enough of them have left the window
            used -= charge.amount
            if used <= room:
                return max(charge.time + TOKEN_WINDOW_S - now, 0.001)
        return TOKEN_WINDOW_S  # unreachable: once every charge has left, used is 0

    def take(self, client: str, amount: int) -> TokenCharge | float:
        """A charge of `amount` if it fits (wait_for), else the seconds to wait."""
        wait = self.wait_for(client, amount)
        if wait is not None:
            return wait
        return self.charge(client, amount)

    def charge(self, client: str, amount: int) -> TokenCharge:
        """Charge `amount` now, whether it fits or not."""
        now = self._clock()
        charges = self._live(client, now)
        charge = TokenCharge(now, amount)
        charges.append(charge)
        if len(charges) > MAX_CHARGES_PER_CLIENT:
            # Merge the two oldest under the later time: they leave the window later, never sooner.
            first, second = charges.popleft(), charges.popleft()
            charges.appendleft(TokenCharge(second.time, first.amount + second.amount))
        return charge


class TokenReservation:
    """Tokens held for one request from admission to its end; settle(used) gives back the rest."""

    def __init__(self, charge: TokenCharge | None) -> None:
        self._charge = charge

    @property
    def amount(self) -> int:
        return self._charge.amount if self._charge is not None else 0

    def settle(self, used: int) -> None:
        if self._charge is not None:
            self._charge.settle(used)
            self._charge = None


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
        self.tokens = TokenWindow(tpm, clock) if tpm else None
        self.auth_failures = TokenBucket(auth_failures_per_minute, clock)

    def auth_lockout(self, address: str) -> float | None:
        """Seconds until an address that sent too many wrong keys may try again; None when it may now."""
        return self.auth_failures.wait_for(address, 1.0)

    def auth_failed(self, address: str) -> None:
        self.auth_failures.charge(address, 1.0)

    def admit(self, client: str) -> None:
        """Count the request, or raise APIError 429 (with Retry-After) when the client must wait. A client
        whose token window is full is refused here, before its body is even read."""
        if self.tokens is not None:
            wait = self.tokens.wait_for(client, 1)
            if wait is not None:
                raise _too_many(
                    f"tokens/minute limit ({self.tokens.limit}) reached", "rate_limit_exceeded", wait
                )
        if self.requests is not None:
            wait = self.requests.take(client, 1.0)
            if wait is not None:
                limit = round(self.requests.capacity)
                raise _too_many(f"requests/minute limit ({limit}) reached", "rate_limit_exceeded", wait)

    def reserve_tokens(self, client: str, amount: int) -> TokenReservation:
        """Hold `amount` tokens (prompt + the most the answer may use) for a request about to run, or raise
        APIError 429 when the client's last 60 s leave no room for it. Settle the reservation at the end."""
        if self.tokens is None:
            return TokenReservation(None)
        taken = self.tokens.take(client, amount)
        if isinstance(taken, float):
            larger = amount > self.tokens.limit
            what = (
                f"this request may use {amount} tokens, more than the {self.tokens.limit} tokens/minute "
                "limit: it runs only when no other tokens were used in the last minute"
                if larger
                else f"tokens/minute limit ({self.tokens.limit}) reached; lower max_tokens or wait"
            )
            raise _too_many(what, "rate_limit_exceeded", taken)
        return TokenReservation(taken)


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """Networks from CIDR strings ("10.0.0.0/8", "::1", "192.168.1.7"); ValueError names a bad one."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(
                f"{cidr!r} is not an IP network; write it like 10.0.0.0/8 or 127.0.0.1"
            ) from None
    return tuple(networks)


def in_networks(address: str | None, networks: Sequence[Network]) -> bool:
    if not address or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def forwarded_client(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> str | None:
    """The client address: the rightmost X-Forwarded-For hop that is not a trusted proxy, only when the
    direct peer is one; else the peer. A malformed hop ends the walk (what is left of it was client-sent)."""
    if not in_networks(peer, trusted):
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",")]
    client = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break
        client = hop
        if not in_networks(hop, trusted):
            break
    return client


class ClientAddressMiddleware:
    """Sets scope["client"] to the forwarded client address for requests from trusted proxies."""

    def __init__(self, app: ASGIApp, trusted_proxies: Sequence[str]) -> None:
        self.app = app
        self.trusted = parse_networks(trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.trusted:
            peer = scope.get("client")
            forwarded = [v.decode("latin-1") for k, v in scope["headers"] if k == b"x-forwarded-for"]
            if peer and forwarded:
                client = forwarded_client(peer[0], forwarded, self.trusted)
                if client != peer[0]:
                    scope["client"] = (client, 0)
        await self.app(scope, receive, send)


class CORSGate(CORSMiddleware):
    """Starlette's CORS, except that a preflight from an origin not allowed is not answered here: it goes on
    to the key check like any other request (so only an allowed origin's preflight skips the key)."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        super().__init__(
            app,
            allow_origins=list(origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=list(CORS_EXPOSED_HEADERS),
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            preflight = origin is not None and "access-control-request-method" in headers
            if preflight and not self.is_allowed_origin(origin):
                await self.app(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _bearer(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    values = [v for k, v in headers if k.lower() == b"authorization"]
    if len(values) != 1:
        return None  # none, or ambiguous
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


def _x_api_key(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    # Anthropic's clients send the key as `x-api-key: <key>`; it is accepted beside the bearer token.
    values = [v for k, v in headers if k.lower() == b"x-api-key"]
    if len(values) != 1:
        return None  # none, or ambiguous
    return values[0].strip() or None


class SecurityMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        api_keys: Sequence[str],
        limiter: RateLimiter,
        max_body_bytes: int,
        body_timeout: float = 30.0,
        body_caps: Mapping[str, tuple[int, str]] | None = None,
    ) -> None:
        """body_caps: path → (its own body cap, what to say in its 413), for uploads (/v1/files)."""
        self.app = app
        self._keys = [(key_id(k), k.encode("utf-8")) for k in api_keys]
        self.limiter = limiter
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.body_caps = dict(body_caps or {})

    def authenticate(self, headers: Sequence[tuple[bytes, bytes]], path: str = "") -> str | None:
        """The id of the key presented, or None. Every key is compared, in constant time, whatever matched.
        Under Anthropic's paths (errors.wire_of) the key may come as x-api-key, as its clients send it."""
        x_api_key = _x_api_key(headers) if wire_of(path) == "anthropic" else None
        token = _bearer(headers) or x_api_key or b""
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
            if self._keys and path not in PUBLIC_PATHS:
                kid = self.authenticate(scope["headers"], path)
                if kid is None:
                    # Only attempts without a valid key meet the lockout: a valid key always gets in.
                    client = scope.get("client")
                    address = f"ip:{client[0] if client else '?'}"
                    locked = self.limiter.auth_lockout(address)
                    if locked is not None:
                        what = "too many requests with a wrong API key from this address"
                        raise _too_many(what, "too_many_auth_failures", locked)
                    self.limiter.auth_failed(address)
                    raise APIError(
                        401,
                        "missing or invalid API key: send the header 'Authorization: Bearer <key>'"
                        + (" or 'x-api-key: <key>'" if wire_of(path) == "anthropic" else ""),
                        code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                if info is not None:
                    info.key_id = kid
            if path not in UNLIMITED_PATHS:
                self.limiter.admit(info.rate_key if info is not None else "?")
            body = await self._read_body(scope, receive, path)
        except APIError as err:
            if info is not None:
                info.rejected, info.error_type = err.reason, err.type
            await err.send(send, wire_of(path))
            return
        if info is not None:
            info.body_bytes = len(body)
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive, path: str) -> bytes:
        # An error before the whole body arrived closes the connection: the rest of it is never read.
        close = {"Connection": "close"}
        cap, hint = self.body_caps.get(path, (self.max_body_bytes, ""))
        too_large = APIError(
            413,
            f"request body is larger than {cap} bytes{hint}",
            code="request_too_large",
            headers=close,
        )
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise APIError(400, "invalid Content-Length header", headers=close) from None
                if declared > cap:
                    raise too_large
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise APIError(
                    408,
                    f"the request body did not arrive within {self.body_timeout:g} seconds",
                    code="request_timeout",
                    reason="body_timeout",
                    headers=close,
                ) from None
            if message["type"] != "http.request":
                raise APIError(400, "the client went away while sending the body", reason="disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
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
