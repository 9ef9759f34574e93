"""Run an app with uvicorn on a socket we bind ourselves, with a graceful SIGTERM.

Contract: bind_socket() binds AND listens, so it fails early with a one-line ServeError (port in use, even by
a second server started at the same moment; bad host). Connections speak HTTP/1.1 through
GuardedH11Protocol: a connection between requests (waiting for a head, or for the unread rest of a body
already answered) is closed after header_timeout seconds (408 when part of a head came); an address beyond
max_connections_per_address open connections is refused (429, closed; trusted proxies are exempt); and a
response is never written into a connection the client has closed: that request is logged as disconnected
and asyncio's "socket.send() raised exception." warning is dropped. run_server() serves
until SIGTERM or SIGINT, then stops admitting (the listening socket closes; requests on open connections
get 503), lets in-flight requests finish for up to shutdown_timeout seconds, aborts what is left, shuts
the engine down and returns normally, so the process exits 0. Unlike plain uvicorn it does not re-raise
the signal after shutting down. In a non-main thread (tests) no signals are touched: set should_exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
from collections import Counter
from collections.abc import Callable, Generator
from types import FrameType
from typing import Any, ClassVar

import h11
import uvicorn
from fastapi import FastAPI
from starlette.types import Message
from uvicorn.protocols.http.h11_impl import H11Protocol

from qwenkit.serve.app import serve_context
from qwenkit.serve.errors import APIError
from qwenkit.serve.logs import request_info
from qwenkit.serve.security import Network, in_networks, parse_networks

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
BACKSTOP_S = 5.0  # after the abort, how long uvicorn still waits for connections before cancelling them
LISTEN_BACKLOG = 2048  # uvicorn's default
SEND_AFTER_CLOSE = "socket.send() raised exception."


class ServeError(OSError):
    """The server cannot start where asked; the message is one line naming the fix."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ServeError(f"cannot resolve --host {host!r} ({exc.strerror}); use an IP address") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)  # a bound but idle socket does not keep a second server off the port
    except OSError as exc:
        sock.close()
        raise ServeError(
            f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host"
        ) from None
    sock.set_inheritable(True)
    return sock


def _raw_response(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 error response with an OpenAI-style body, written before any request was read."""
    body = json.dumps(APIError(status, message).body())
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
    return f"{head}content-length: {len(body)}\r\n\r\n{body}".encode("ascii")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout, a per-address connection cap, and no writes into
    a connection the client closed. make_server() makes a subclass per server with its own limits."""

    header_timeout: float = 10.0
    max_per_address: int = 64
    exempt: ClassVar[tuple[Network, ...]] = ()  # trusted proxy networks: many clients share their address
    open_per_address: ClassVar[Counter[str]] = Counter()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._counted: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        address = self.client[0] if self.client else None
        if address is not None and not in_networks(address, self.exempt):
            if self.open_per_address[address] >= self.max_per_address:
                self.connections.discard(self)
                transport.write(_raw_response(429, "Too Many Requests", "too many open connections"))
                transport.close()
                return
            self.open_per_address[address] += 1
            self._counted = address
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._counted is not None:
            self.open_per_address[self._counted] -= 1
            if self.open_per_address[self._counted] <= 0:
                del self.open_per_address[self._counted]
            self._counted = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self.cycle is not None:
            self._guard_send(self.cycle)

    def _between_requests(self) -> bool:
        """No request is being served: the connection waits for a head, or for the unread rest of a body
        whose request was already answered. Only the client can end that wait."""
        serving = self.cycle is not None and not self.cycle.response_complete
        return (
            not serving
            and self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
            and not self.transport.is_closing()
        )

    def _watch_head(self) -> None:
        # One deadline per wait (not per byte), so dripping a head or a refused body slowly does not help.
        if self._between_requests():
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
        else:
            self._cancel_head_timer()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._between_requests():
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            message = f"the request headers did not arrive within {self.header_timeout:g} seconds"
            self.transport.write(_raw_response(408, "Request Timeout", message))
        self.transport.close()

    def _guard_send(self, cycle: Any) -> None:
        # The app may still send after the client closed and before uvicorn hears of it: such a write
        # fills asyncio's log with warnings; count the request as disconnected instead.
        send = cycle.send
        transport = self.transport

        async def guarded(message: Message) -> None:
            if transport.is_closing() and not cycle.response_complete:
                cycle.disconnected = True
                info = request_info(cycle.scope)
                if info is not None:
                    info.disconnected = True
            await send(message)

        cycle.send = guarded


class _DropSendAfterClose(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != SEND_AFTER_CLOSE


def _quiet_asyncio() -> None:
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropSendAfterClose) for f in logger.filters):
        logger.addFilter(_DropSendAfterClose())


def guarded_protocol(
    header_timeout: float, max_per_address: int, exempt: tuple[str, ...]
) -> type[H11Protocol]:
    """A GuardedH11Protocol class with these limits and its own per-address counts (one per server)."""
    return type(
        "ServerH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout": header_timeout,
            "max_per_address": max_per_address,
            "exempt": parse_networks(exempt),
            "open_per_address": Counter(),
        },
    )


class GracefulServer(uvicorn.Server):
    """uvicorn's Server with a drain step on the first signal and no re-raised signal at the end."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = not self.should_exit
        super().handle_exit(sig, frame)
        if first and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_exit)


def make_server(app: FastAPI, shutdown_timeout: float) -> GracefulServer:
    """A server for an app made by create_app; its first signal drains the app's ServeContext."""
    ctx = serve_context(app)
    cfg = ctx.config
    _quiet_asyncio()
    config = uvicorn.Config(
        app,
        http=guarded_protocol(cfg.header_timeout, cfg.max_connections_per_address, cfg.trusted_proxies),
        log_level="warning",
        access_log=False,  # the app writes its own structured access log
        lifespan="on",
        ws="none",
        proxy_headers=False,  # rate limits per client address must not trust a client-sent header
        server_header=False,
        timeout_graceful_shutdown=int(shutdown_timeout + BACKSTOP_S),
    )

    def drain() -> None:
        ctx.begin_drain()
        asyncio.get_running_loop().call_later(shutdown_timeout, ctx.abort_all)

    return GracefulServer(config, drain)


def run_server(app: FastAPI, sock: socket.socket, shutdown_timeout: float) -> None:
    """Serve on an already bound socket until a signal; returns after a graceful shutdown."""
    make_server(app, shutdown_timeout).run(sockets=[sock])
