"""Helpers for the server tests: the real engine on a demo GGUF, a recorder around it, a scripted fake
Engine, an in-process client, a real server on loopback.

demo_engine() is the llama.cpp engine sized for tests; RecordingEngine passes everything to a real engine
and keeps each GenerationRequest it was given, so tests can check what reached the engine. FakeEngine
implements the Engine protocol with scripted text: only for what a real engine cannot be made to do (write
a given text, such as a tool call in auto mode, split at chosen points; refuse at submit; fail mid-way).
live_server() runs the real uvicorn server with the tiny qwen3 demo model on 127.0.0.1 (a free port) in a
background thread (or, given embedding=, the tiny Qwen3-Embedding-shaped demo on its embedding engine);
serve_app() does the same for any app;
keyed_server() makes the module-scoped `server` fixture the SDK test files share: that server with API_KEY.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from qwenkit.chat.flavor import Flavor
from qwenkit.checkpoints.embedding import EmbeddingSpec
from qwenkit.engines.base import Engine
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.embedder import LlamaEmbedder
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.engines.request import EngineError, EngineStats, GenerationRequest, TokenEvent, TokenLogprob
from qwenkit.serve.app import create_app
from qwenkit.serve.config import ServeConfig
from qwenkit.serve.server import bind_socket, make_server
from qwenkit.tokenizer.tokenizer import QwenTokenizer

MODEL = "qwen3-demo"
API_KEY = "sk-test-0123456789abcdef"
# A function tool whose one argument the grammar can only fill with a listed city.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def demo_engine(gguf: Path, n_ctx: int = 4096, max_seqs: int = 8) -> LlamaCppEngine:
    """The llama.cpp engine on a (demo) GGUF, 2 threads; n_ctx: the most tokens one request may use."""
    return LlamaCppEngine(gguf, EngineConfig.for_workload(max_seqs, n_ctx, threads=2, max_waiting=64))


@dataclass
class RecordingEngine:
    """A real engine that keeps every GenerationRequest it is given (and whether it was started/shut down)."""

    engine: Engine
    requests: list[GenerationRequest] = field(default_factory=list)
    started: bool = False
    shut_down: bool = False

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    def start(self) -> None:
        self.started = True
        self.engine.start()

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        self.requests.append(request)
        return self.engine.generate(request)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def shutdown(self, timeout: float = 10.0) -> None:
        self.shut_down = True
        self.engine.shutdown(timeout)


def demo_app(
    engine: Engine,
    tokenizer: QwenTokenizer,
    config: ServeConfig | None = None,
    family: object = Flavor.QWEN3,
    **kw: object,
) -> FastAPI:
    """The server's app over an engine, for the tiny qwen3 demo model (or `family`'s) served as MODEL."""
    return create_app(engine, tokenizer, family, MODEL, config, **kw)  # type: ignore[arg-type]


@dataclass
class FakeEngine:
    """Answers each request with `script(request)` split into `chunk`-character events.

    hold=True: emit the first chunk, then wait until aborted (to test disconnects). submit_error: raised
    when a request is submitted, as a real engine does for what it cannot run.
    """

    tokenizer: QwenTokenizer
    script: Callable[[GenerationRequest], str] = lambda request: "hello world"
    chunk: int = 3
    finish: str = "stop"
    hold: bool = False
    submit_error: EngineError | None = None
    n_ctx: int = 2048
    requests: list[GenerationRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)
    started: bool = False
    shut_down: bool = False

    def start(self) -> None:
        self.started = True

    def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.aborted.append(request_id)
            self.running.discard(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.running),
            waiting=0,
            kv_used=7 * len(self.running),
            kv_total=self.n_ctx,
            steps=0,
            preemptions=0,
        )

    def shutdown(self, timeout: float = 10.0) -> None:
        self.shut_down = True

    def _logprobs(self, ids: list[int], k: int | None) -> list[TokenLogprob] | None:
        if k is None:
            return None
        return [TokenLogprob(t, -0.5, tuple((t + j, -0.5 - j) for j in range(k))) for t in ids]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        if self.submit_error is not None:
            raise self.submit_error
        self.requests.append(request)
        self.running.add(request.request_id)
        text = self.script(request)
        pieces = [text[i : i + self.chunk] for i in range(0, len(text), self.chunk)] or [""]
        produced = 0
        rid = request.request_id
        try:
            for i, piece in enumerate(pieces):
                await asyncio.sleep(0)
                if rid not in self.running:
                    yield TokenEvent(rid, [], "", "abort", len(request.prompt_token_ids), produced)
                    return
                ids = self.tokenizer.encode(piece)
                produced += len(ids)
                last = i == len(pieces) - 1
                if self.hold and i == 1:
                    while rid in self.running:
                        await asyncio.sleep(0.01)
                    yield TokenEvent(rid, [], "", "abort", len(request.prompt_token_ids), produced)
                    return
                yield TokenEvent(
                    rid,
                    ids,
                    piece,
                    self.finish if last else None,  # type: ignore[arg-type]
                    prompt_tokens=len(request.prompt_token_ids),
                    completion_tokens=produced,
                    logprobs=self._logprobs(ids, request.logprobs),
                )
        finally:
            self.running.discard(rid)


def fake_app(engine: FakeEngine, config: ServeConfig | None = None, **kw: object) -> FastAPI:
    return demo_app(engine, engine.tokenizer, config, **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def in_process(app: FastAPI) -> Iterator[TestClient]:
    """An in-process client; the app's lifespan runs around it."""
    with TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000)) as client:
        yield client


@dataclass
class LiveServer:
    base_url: str
    engine: LlamaCppEngine | LlamaEmbedder
    app: FastAPI
    api_key: str | None


@contextlib.contextmanager
def live_server(
    gguf: Path,
    checkpoint: Path,
    config: ServeConfig | None = None,
    n_ctx: int = 4096,
    max_seqs: int = 8,
    clock: Callable[[], float] | None = None,
    family: object = Flavor.QWEN3,
    embedding: EmbeddingSpec | None = None,
) -> Iterator[LiveServer]:
    """The real server (uvicorn, the llama.cpp engine, the tiny demo model) on 127.0.0.1, any free port.
    n_ctx: the most tokens one request may use; clock: the rate limiter's time source; embedding: serve
    an embedding demo (its spec) on the llama.cpp embedding engine instead."""
    engine: LlamaCppEngine | LlamaEmbedder
    if embedding is not None:
        engine = LlamaEmbedder(gguf, EngineConfig(n_ctx=n_ctx * max_seqs, max_seqs=max_seqs, threads=2))
    else:
        engine = demo_engine(gguf, n_ctx, max_seqs)
    config = config or ServeConfig()
    tokenizer = QwenTokenizer.from_dir(checkpoint)
    app = demo_app(engine, tokenizer, config, family, clock=clock, embedding=embedding)
    key = config.api_keys[0].get_secret_value() if config.api_keys else None
    with serve_app(app) as url:
        yield LiveServer(url, engine, app, key)


@contextlib.contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """The real uvicorn server for `app` on 127.0.0.1 (a free port) in a background thread; its base URL."""
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(app, shutdown_timeout=5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def keyed_server(n_ctx: int, *other_keys: str, **config: object) -> Any:
    """A module-scoped `server` fixture: live_server() on the tiny qwen3 demo (f32 GGUF) with API_KEY (and
    other_keys) required and `config`'s other ServeConfig fields; n_ctx: the most tokens one request may use.
    Use it as `server = keyed_server(8192)` in a test module."""

    @pytest.fixture(scope="module")
    def server(demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path]) -> Iterator[LiveServer]:
        settings = ServeConfig(api_keys=(API_KEY, *other_keys), **config)  # type: ignore[arg-type]
        gguf, checkpoint = demo_gguf("qwen3", "tiny", "f32"), demo_checkpoint("qwen3", "tiny")
        with live_server(gguf, checkpoint, settings, n_ctx=n_ctx) as live:
            yield live

    return server
