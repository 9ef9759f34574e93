"""Run an app with uvicorn on a socket we bind ourselves, with a graceful SIGTERM.

Contract: bind_socket() fails early with a one-line ServeError (port in use, bad host). run_server() serves
until SIGTERM or SIGINT, then stops admitting (the listening socket closes; requests on open connections
get 503), lets in-flight requests finish for up to shutdown_timeout seconds, aborts what is left, shuts
the engine down and returns normally, so the process exits 0. Unlike plain uvicorn it does not re-raise
the signal after shutting down. In a non-main thread (tests) no signals are touched: set should_exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Generator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from qwenkit.serve.app import serve_context

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
BACKSTOP_S = 5.0  # after the abort, how long uvicorn still waits for connections before cancelling them


class ServeError(OSError):
    """The server cannot start where asked; the message is one line naming the fix."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port (port 0: any free port)."""
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
    except OSError as exc:
        sock.close()
        raise ServeError(
            f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host"
        ) from None
    sock.set_inheritable(True)
    return sock


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
    config = uvicorn.Config(
        app,
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
