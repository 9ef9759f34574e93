"""The server's guards against slow, greedy and cross-origin clients, on the real tiny demo engine: request
head and body timeouts, the per-address connection cap, one early error for a busy port, no log noise for a
client that went away, CORS, the wrong-key lockout that never refuses a valid key, X-Forwarded-For from
trusted proxies only, and tokens/minute reserved at admission."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
import uvicorn
from typer.testing import CliRunner
from uvicorn.server import ServerState

from qwenkit.cli.serve import serve_command
from qwenkit.serve.app import serve_context
from qwenkit.serve.config import ServeConfig
from qwenkit.serve.errors import APIError
from qwenkit.serve.logs import SCOPE_KEY, RequestInfo
from qwenkit.serve.security import RateLimiter, forwarded_client, parse_networks
from qwenkit.serve.server import SEND_AFTER_CLOSE, ServeError, bind_socket, guarded_protocol
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import API_KEY, MODEL, LiveServer, demo_app, demo_engine, in_process, live_server

N_CTX = 1024
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ORIGIN = "https://app.example"
TIMEOUT_S = 2.0  # the guarded server's header and body timeouts (short, so the tests are quick)
MAX_CONNECTIONS = 4


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


@pytest.fixture(scope="module")
def demo(demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path]) -> tuple[Path, Path]:
    return demo_gguf("qwen3", "tiny", "f32"), demo_checkpoint("qwen3", "tiny")


@pytest.fixture(scope="module")
def guarded(demo: tuple[Path, Path]) -> Iterator[LiveServer]:
    config = ServeConfig(
        api_keys=(API_KEY,),  # type: ignore[arg-type]
        header_timeout=TIMEOUT_S,
        body_timeout=TIMEOUT_S,
        max_connections_per_address=MAX_CONNECTIONS,
        cors_origins=(ORIGIN,),
    )
    with live_server(*demo, config, n_ctx=N_CTX, max_seqs=2) as live:
        yield live


def connect(server: LiveServer) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket timeout: it never did)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# ---- 5c: slow clients --------------------------------------------------------------------------------------


def test_half_sent_headers_are_answered_408_and_closed(guarded: LiveServer) -> None:
    with connect(guarded) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"request headers did not arrive within 2 seconds" in answer


def test_a_silent_connection_is_closed(guarded: LiveServer) -> None:
    with connect(guarded) as sock:
        assert read_until_closed(sock) == b""


def test_half_sent_body_is_answered_408_and_closed(guarded: LiveServer) -> None:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: 100\r\n\r\n"
    )
    with connect(guarded) as sock:
        sock.sendall(head.encode() + b'{"model": ')
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout" and "2 seconds" in body["error"]["message"]


def test_dripping_a_refused_body_does_not_keep_the_connection(guarded: LiveServer) -> None:
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    with connect(guarded) as sock:
        sock.sendall(head.encode() + b"x" * 10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 401 ")  # answered without reading the body
        sock.settimeout(0.5)
        closed = False
        for _ in range(40):  # a byte every half second, far past the timeout
            try:
                sock.sendall(b"x")
                closed = sock.recv(65536) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
            if closed:
                break
    assert closed


def test_connections_per_address_are_capped(guarded: LiveServer) -> None:
    held = [connect(guarded) for _ in range(MAX_CONNECTIONS)]
    try:
        with connect(guarded) as extra:
            answer = read_until_closed(extra)
        assert answer.startswith(b"HTTP/1.1 429 ") and b"too many open connections" in answer
    finally:
        for sock in held:
            sock.close()
    # The count goes down as connections close: a new one is served again.
    deadline = time.monotonic() + 30
    while True:
        try:
            status = httpx.get(f"{guarded.base_url}/health", timeout=30).status_code
        except httpx.TransportError:
            status = None
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200


def test_normal_requests_still_work(guarded: LiveServer) -> None:
    with httpx.Client(base_url=guarded.base_url, headers=AUTH, timeout=60) as client:
        for _ in range(3):  # one kept-alive connection, several requests
            answer = client.post("/v1/chat/completions", json=chat_body())
            assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        assert client.get("/v1/models").status_code == 200


# ---- 5d: a busy port, a client that went away --------------------------------------------------------------


def test_a_port_bound_by_another_server_fails_at_bind() -> None:
    first = bind_socket("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port).close()
    finally:
        first.close()


class _ClosingTransport:
    """A transport whose peer has gone: what asyncio's socket transport is between the failed send and
    connection_lost (a race a real socket cannot be made to lose on demand)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...


def test_sends_after_the_client_left_count_as_a_disconnect(
    guarded: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    info = RequestInfo(id="r", method="GET", route="/x", client="127.0.0.1")
    transport = _ClosingTransport()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope[SCOPE_KEY] = info
        await send({"type": "http.response.start", "status": 200, "headers": []})
        transport.closing = True  # the client went away mid-stream
        for _ in range(10):
            await send({"type": "http.response.body", "body": b"chunk", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def run() -> None:
        config = uvicorn.Config(app, log_level="warning")
        config.load()
        protocol = guarded_protocol(10.0, 8, ())(
            config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
        )
        protocol.connection_made(transport)  # type: ignore[arg-type]
        protocol.data_received(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.gather(*protocol.tasks)
        protocol.connection_lost(None)

    asyncio.run(run())
    assert len(transport.writes) == 1  # the head only: nothing was written into the closed connection
    assert info.disconnected
    # The same race on a real socket makes asyncio log a warning per write: the server drops that line.
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        logging.getLogger("asyncio").warning(SEND_AFTER_CLOSE)
        logging.getLogger("asyncio").warning("another asyncio warning")
    messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert messages == ["another asyncio warning"]


# ---- 9: CORS -----------------------------------------------------------------------------------------------


def preflight(origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


def test_cors_preflight_from_an_allowed_origin(guarded: LiveServer) -> None:
    answer = httpx.options(f"{guarded.base_url}/v1/chat/completions", headers=preflight(ORIGIN))
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in answer.headers["access-control-allow-methods"]
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()


def test_cors_requests_still_need_the_key(guarded: LiveServer) -> None:
    url = f"{guarded.base_url}/v1/chat/completions"
    other = httpx.options(url, headers=preflight("https://evil.example"))
    assert other.status_code == 401 and "access-control-allow-origin" not in other.headers
    no_key = httpx.post(url, json=chat_body(), headers={"Origin": ORIGIN})
    assert no_key.status_code == 401  # the browser may read the refusal, but it is a refusal
    assert no_key.headers["access-control-allow-origin"] == ORIGIN
    ok = httpx.post(url, json=chat_body(), headers={"Origin": ORIGIN, **AUTH}, timeout=60)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in ok.headers["access-control-expose-headers"]


def test_no_cors_unless_configured(demo: tuple[Path, Path]) -> None:
    gguf, checkpoint = demo
    app = demo_app(demo_engine(gguf, N_CTX, 1), QwenTokenizer.from_dir(checkpoint), ServeConfig())
    with in_process(app) as client:
        answer = client.options("/v1/chat/completions", headers=preflight(ORIGIN))
        assert answer.status_code == 405 and "access-control-allow-origin" not in answer.headers
        plain = client.get("/v1/models", headers={"Origin": ORIGIN})
        assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


def test_cors_origins_are_checked() -> None:
    with pytest.raises(ValueError, match="scheme://host"):
        ServeConfig(cors_origins=("app.example",))
    with pytest.raises(ValueError, match="scheme://host"):
        ServeConfig(cors_origins=("https://app.example/path",))
    assert ServeConfig(cors_origins=("*", "http://localhost:3000")).cors_origins[1] == "http://localhost:3000"


# ---- 10: lockout and trusted proxies -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_app(demo: tuple[Path, Path]) -> Callable[..., Any]:
    gguf, checkpoint = demo
    tokenizer = QwenTokenizer.from_dir(checkpoint)

    def make(**fields: Any) -> Any:
        now = [0.0]
        config = ServeConfig(api_keys=(API_KEY,), auth_failures_per_minute=3, **fields)  # type: ignore[arg-type]
        return demo_app(demo_engine(gguf, N_CTX, 1), tokenizer, config, clock=lambda: now[0]), now

    return make


WRONG = {"Authorization": "Bearer sk-wrong-key-000000"}


def test_a_valid_key_is_never_locked_out(keyed_app: Callable[..., Any]) -> None:
    app, now = keyed_app()
    with in_process(app) as client:
        for _ in range(3):
            assert client.get("/v1/models", headers=WRONG).status_code == 401
        locked = client.get("/v1/models", headers=WRONG)
        assert locked.status_code == 429 and locked.json()["error"]["code"] == "too_many_auth_failures"
        assert int(locked.headers["retry-after"]) == 20
        assert client.get("/v1/models").status_code == 429  # no key at all: locked out too
        for _ in range(5):  # more guesses from the same address do not shut the real key out
            assert client.get("/v1/models", headers=AUTH).status_code == 200
            client.get("/v1/models", headers=WRONG)
        now[0] += 20
        assert client.get("/v1/models", headers=WRONG).status_code == 401


def access_clients(caplog: pytest.LogCaptureFixture) -> list[str | None]:
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "qwenkit.serve.access"]
    return [line.get("client") for line in lines]


def test_forwarded_for_is_ignored_from_untrusted_peers(
    keyed_app: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = keyed_app(trusted_proxies=("10.0.0.0/8",))  # the test client is 127.0.0.1: not a proxy
    with in_process(app) as client, caplog.at_level(logging.INFO, logger="qwenkit.serve.access"):
        for i in range(3):
            wrong = {**WRONG, "X-Forwarded-For": f"203.0.113.{i}"}
            assert client.get("/v1/models", headers=wrong).status_code == 401
        fresh = {**WRONG, "X-Forwarded-For": "203.0.113.99"}
        assert client.get("/v1/models", headers=fresh).status_code == 429  # one address: 127.0.0.1
    assert set(access_clients(caplog)) == {"127.0.0.1"}


def test_forwarded_for_is_honoured_from_trusted_proxies(
    keyed_app: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    app, _ = keyed_app(trusted_proxies=("127.0.0.0/8",))
    bad = {**WRONG, "X-Forwarded-For": "203.0.113.5"}
    with in_process(app) as client, caplog.at_level(logging.INFO, logger="qwenkit.serve.access"):
        for _ in range(3):
            assert client.get("/v1/models", headers=bad).status_code == 401
        assert client.get("/v1/models", headers=bad).status_code == 429
        # A spoofed first hop does not help: the proxy appended the real address last.
        spoofed = {**WRONG, "X-Forwarded-For": "198.51.100.1, 203.0.113.5"}
        assert client.get("/v1/models", headers=spoofed).status_code == 429
        other = {**WRONG, "X-Forwarded-For": "203.0.113.6"}
        assert client.get("/v1/models", headers=other).status_code == 401  # another client behind the proxy
    assert access_clients(caplog) == ["203.0.113.5"] * 5 + ["203.0.113.6"]


def test_forwarded_client_walk() -> None:
    proxies = parse_networks(["10.0.0.0/8", "::1"])
    assert forwarded_client("10.1.1.1", ["1.2.3.4, 10.2.2.2"], proxies) == "1.2.3.4"
    assert forwarded_client("10.1.1.1", ["1.2.3.4", "5.6.7.8"], proxies) == "5.6.7.8"  # two headers: one list
    assert forwarded_client("8.8.8.8", ["1.2.3.4"], proxies) == "8.8.8.8"  # not from a proxy: ignored
    assert forwarded_client("::1", ["10.0.0.1"], proxies) == "10.0.0.1"  # all trusted: the farthest
    assert forwarded_client("10.1.1.1", ["1.2.3.4, garbage, 10.2.2.2"], proxies) == "10.2.2.2"
    assert forwarded_client("::ffff:10.0.0.3", ["1.2.3.4"], proxies) == "1.2.3.4"  # IPv4-mapped peer
    with pytest.raises(ValueError, match="not an IP network"):
        ServeConfig(trusted_proxies=("10.0.0.0/33",))


# ---- 11: tokens/minute reserved at admission ---------------------------------------------------------------

TPM = 200


def test_tokens_per_minute_hold_under_concurrency(demo: tuple[Path, Path]) -> None:
    now = [0.0]
    config = ServeConfig(rate_limit_tpm=TPM)
    with live_server(*demo, config, n_ctx=N_CTX, max_seqs=8, clock=lambda: now[0]) as live:
        limiter = serve_context(live.app).limiter
        results: list[httpx.Response] = []
        barrier = threading.Barrier(16)

        def one() -> None:
            barrier.wait()
            body = chat_body(max_tokens=64, temperature=0)
            results.append(httpx.post(f"{live.base_url}/v1/chat/completions", json=body, timeout=120))

        threads = [threading.Thread(target=one) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        served = [r.json()["usage"] for r in results if r.status_code == 200]
        refused = [r for r in results if r.status_code == 429]
        assert served and refused and len(served) + len(refused) == 16
        assert all(int(r.headers["retry-after"]) >= 1 for r in refused)
        reservation = served[0]["prompt_tokens"] + 64  # every request here reserves the same
        charged = sum(u["total_tokens"] for u in served)
        assert charged <= TPM + reservation
        assert limiter.tokens is not None
        assert limiter.tokens.used("ip:127.0.0.1") == charged  # every reservation settled to what was used
        now[0] += 61  # the next minute admits again
        again = httpx.post(f"{live.base_url}/v1/chat/completions", json=chat_body(), timeout=60)
        assert again.status_code == 200


@pytest.mark.slow  # 11-15 s
def test_a_request_larger_than_the_limit_runs_alone(demo: tuple[Path, Path]) -> None:
    now = [0.0]
    config = ServeConfig(rate_limit_tpm=TPM)
    gguf, checkpoint = demo
    app = demo_app(
        demo_engine(gguf, N_CTX, 1), QwenTokenizer.from_dir(checkpoint), config, clock=lambda: now[0]
    )
    with in_process(app) as client:
        # No max_tokens: the rest of the context is reserved, more than a minute's tokens.
        big = {**chat_body(), "max_tokens": None}
        assert client.post("/v1/chat/completions", json=big).status_code == 200  # nothing else this minute
        again = client.post("/v1/chat/completions", json=big)
        assert again.status_code == 429 and int(again.headers["retry-after"]) >= 1
        assert "tokens/minute" in again.json()["error"]["message"]
        now[0] += 61
        assert client.post("/v1/chat/completions", json=big).status_code == 200


def test_token_window_reservations() -> None:
    now = [0.0]
    limiter = RateLimiter(None, 100, clock=lambda: now[0])
    first = limiter.reserve_tokens("a", 60)
    with pytest.raises(APIError) as refused:
        limiter.reserve_tokens("a", 60)  # 120 > 100
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "60"
    first.settle(10)  # the unused 50 go back at once
    second = limiter.reserve_tokens("a", 60)
    now[0] = 30.0
    with pytest.raises(APIError) as larger:
        limiter.reserve_tokens("a", 500)  # more than the limit: only into a window with nothing charged
    assert "more than the 100 tokens/minute" in larger.value.message
    assert larger.value.headers["Retry-After"] == "30"  # when `second` (charged at 0) leaves the window
    second.settle(0)
    now[0] = 60.0  # both left the window
    assert limiter.reserve_tokens("a", 500).amount == 500
    now[0] = 119.0
    with pytest.raises(APIError, match="tokens/minute limit"):
        limiter.admit("a")  # the window is full: refused before the body is read
    now[0] = 120.0
    limiter.admit("a")
    assert limiter.reserve_tokens("b", 100).amount == 100  # another client, another window


def test_serve_flags_are_checked_before_anything_starts() -> None:
    app = typer.Typer()
    app.command("serve")(serve_command)
    app.callback()(lambda: None)
    runner = CliRunner()
    for args, message in (
        (["--cors-origins", "https://ok.example,app.example"], "CORS origin 'app.example'"),
        (["--trusted-proxies", "10.0.0.0/8, nonsense"], "'nonsense' is not an IP network"),
    ):
        result = runner.invoke(app, ["serve", "--port", "0", *args])
        output = result.output + (result.stderr if result.stderr_bytes is not None else "")
        assert result.exit_code != 0 and message in output and "Traceback" not in output
