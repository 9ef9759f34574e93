"""A light load generator for OpenAI-compatible servers: asyncio and raw sockets, no HTTP library.

It shares the CPU with the server under test, so it does the least it can: one connection per request
(`Connection: close`), chunked transfer decoding, SSE `data:` lines split and JSON-decoded, nothing else.
`sse_events(port, path, payload)` yields the JSON events of one streaming POST (the benchmarks use it);
`stream_request(endpoint, path, payload)` runs one request to the end and returns what a benchmark needs:
the time of each content chunk, the server's `usage`, and a failure kind ("HTTP 500", "disconnected",
"timeout", "stream error", "bad response") instead of raising. `get_json` is a plain GET for /v1/models.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


class HTTPStatusError(RuntimeError):
    """The server answered with a status other than 200."""

    def __init__(self, status: int, body: bytes = b"") -> None:
        super().__init__(f"HTTP {status} from the server")
        self.status = status
        self.body = body


@dataclass(frozen=True)
class Endpoint:
    """Where an OpenAI-compatible server listens: base URL with or without its trailing /v1."""

    url: str
    host: str
    port: int
    tls: bool
    prefix: str  # the path before /v1, usually ""
    api_key: str | None = None

    @classmethod
    def parse(cls, url: str, api_key: str | None = None) -> Endpoint:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base URL {url!r} must look like http://127.0.0.1:8000 (http or https)")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise ValueError(f"base URL {url!r} has a bad port: {exc}") from None
        prefix = parts.path.rstrip("/").removesuffix("/v1")
        return cls(url.strip().rstrip("/"), parts.hostname, port, parts.scheme == "https", prefix, api_key)

    @property
    def label(self) -> str:
        return self.netloc

    def path(self, api_path: str) -> str:
        """api_path (e.g. /v1/completions) under this endpoint's prefix."""
        return self.prefix + api_path

    @property
    def netloc(self) -> str:
        """host:port as a URL or Host header writes it (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def get_json(endpoint: Endpoint, api_path: str, timeout: float = 10.0) -> tuple[int, Any, str | None]:
    """(status, decoded JSON body or None, the Server header) of a GET; raises OSError when unreachable."""
    scheme = "https" if endpoint.tls else "http"
    url = f"{scheme}://{endpoint.netloc}{endpoint.path(api_path)}"
    request = urllib.request.Request(url, headers=endpoint.headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw, server = response.status, response.read(), response.headers.get("Server")
    except urllib.error.HTTPError as exc:
        status, raw, server = exc.code, exc.read(), exc.headers.get("Server")
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from None
    try:
        return status, json.loads(raw), server
    except ValueError:
        return status, None, server


async def _body_chunks(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    """The response body as it arrives: chunked transfer encoding decoded, or raw reads until EOF."""
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            return
        yield (await reader.readexactly(size + 2))[:-2]


async def sse_data(
    port: int,
    path: str,
    payload: dict[str, Any],
    *,
    host: str = "127.0.0.1",
    tls: bool = False,
    headers: dict[str, str] | None = None,
) -> AsyncIterator[bytes]:
    """The `data:` fields of one streaming POST, `[DONE]` included; a status other than 200 raises
    HTTPStatusError, a connection that closes inside a chunk raises asyncio.IncompleteReadError."""
    body = json.dumps(payload).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {netloc}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    context = ssl.create_default_context() if tls else None
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        writer.write(head + body)
        status = (await reader.readuntil(b"\r\n")).split()
        headers_raw = (await reader.readuntil(b"\r\n\r\n")).lower()
        if len(status) < 2 or status[1] != b"200":
            code = int(status[1]) if len(status) > 1 and status[1].isdigit() else 0
            raise HTTPStatusError(code, await reader.read(4096))
        pending = b""
        async for data in _body_chunks(reader, b"transfer-encoding: chunked" in headers_raw):
            events = (pending + data).replace(b"\r\n", b"\n").split(b"\n\n")
            pending = events.pop()
            for event in events:
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        yield line[5:].strip()
    finally:
        writer.close()


async def sse_events(
    port: int, path: str, payload: dict[str, Any], host: str = "127.0.0.1"
) -> AsyncIterator[dict[str, Any]]:
    """The JSON events of one streaming POST over a raw socket: a load generator far lighter than an HTTP
    library, since it shares the CPU with the server under test (its CPU time is reported)."""
    async for data in sse_data(port, path, payload, host=host):
        if data and data != b"[DONE]":
            yield json.loads(data)


@dataclass
class RequestRecord:
    """One request as the client saw it (perf_counter seconds); `error` is None when it completed."""

    sent: float
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # content chunks (text, reasoning or tools)
    first_event: float | None = None  # the first event with choices (a chat stream's role chunk)
    usage_completion: int | None = None
    usage_prompt: int | None = None
    error: str | None = None
    detail: str | None = None  # the start of an error body, for messages

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tokens(self) -> int:
        """Tokens received: the server's usage when it sent one, else the content chunks counted."""
        return self.usage_completion if self.usage_completion is not None else len(self.chunk_times)


def _has_content(choice: dict[str, Any]) -> bool:
    if choice.get("text"):
        return True
    delta = choice.get("delta") or {}
    return bool(
        delta.get("content")
        or delta.get("reasoning_content")
        or delta.get("reasoning")
        or delta.get("tool_calls")
    )


async def stream_request(
    endpoint: Endpoint, api_path: str, payload: dict[str, Any], timeout: float = 600.0
) -> RequestRecord:
    """Run one streaming request to its end; failures are recorded in `error`, never raised."""
    record = RequestRecord(sent=time.perf_counter())
    finished = False  # [DONE] or a finish_reason: a stream that ends without either was cut off
    events = 0
    try:
        async with asyncio.timeout(timeout):
            stream = sse_data(
                endpoint.port,
                endpoint.path(api_path),
                payload,
                host=endpoint.host,
                tls=endpoint.tls,
                headers=endpoint.headers(),
            )
            async for data in stream:
                events += 1
                if data == b"[DONE]":
                    finished = True
                    continue
                if not data:
                    continue
                event = json.loads(data)
                if "error" in event:
                    record.error = "stream error"
                    break
                now = time.perf_counter()
                if event.get("choices") and record.first_event is None:
                    record.first_event = now
                for choice in event.get("choices") or ():
                    if _has_content(choice):
                        record.chunk_times.append(now)
                    finished = finished or bool(choice.get("finish_reason"))
                usage = event.get("usage")
                if usage:
                    record.usage_completion = usage.get("completion_tokens")
                    record.usage_prompt = usage.get("prompt_tokens")
    except HTTPStatusError as exc:
        record.error = f"HTTP {exc.status}"
        record.detail = " ".join(exc.body.decode(errors="replace").split())[:200] or None
    except TimeoutError:
        record.error = "timeout"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        record.error = "disconnected"
    except ValueError:
        record.error = "bad response"
    record.end = time.perf_counter()
    if record.error is None and not finished:
        record.error = "disconnected" if events else "bad response"  # no SSE at all: not a stream
    return record
