"""Load on the real server (uvicorn, llama.cpp, the tiny demo model on loopback): /health and /metrics
hammered from four threads while 16 clients start and stop streams, a third of them cancelled mid-stream.

Bounded in count (16 clients × ROUNDS streams) and in time (every request has a timeout; one that runs
out is a hung request). Wants: no 5xx anywhere, no error and no dropped connection, every finished stream
ends with [DONE] and its usage, and the engine idle (nothing running or waiting) once the clients are done.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from qwenkit.serve.config import ServeConfig
from serve_fixtures import API_KEY, MODEL, LiveServer, live_server

pytestmark = pytest.mark.slow

STREAMS = 16
ROUNDS = 4
MAX_TOKENS = 40
CANCEL_AFTER_CHUNKS = 3
TIMEOUT_S = 60.0  # a request that gets nothing for this long is hung
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path]) -> Iterator[LiveServer]:
    config = ServeConfig(api_keys=(API_KEY,))  # type: ignore[arg-type]
    gguf, checkpoint = demo_gguf("qwen3", "tiny", "f32"), demo_checkpoint("qwen3", "tiny")
    with live_server(gguf, checkpoint, config, n_ctx=4096, max_seqs=8) as live:
        yield live


def one_stream(http: httpx.Client, client: int, round_: int, cancel: bool) -> dict[str, Any]:
    """One chat stream; cancel: close the connection after a few chunks."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"client {client}, round {round_}: tell me a story"}],
        "max_tokens": MAX_TOKENS,
        "seed": client * 100 + round_,
        "stream": True,
        "stream_options": {"include_usage": True},
        "chat_template_kwargs": {"enable_thinking": False},
    }
    data: list[str] = []
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            return {"status": response.status_code, "text": response.text[:300]}
        for line in response.iter_lines():
            if line.startswith("data: "):
                data.append(line[len("data: ") :])
                if cancel and len(data) >= CANCEL_AFTER_CHUNKS:
                    return {"status": 200, "cancelled": True, "data": data}
    return {"status": 200, "cancelled": False, "data": data}


def hammer(base_url: str, path: str, stop: threading.Event, statuses: list[int | str]) -> None:
    """GET path until stopped; a status per request, or the name of the error that ended the loop."""
    with httpx.Client(base_url=base_url, headers=HEADERS, timeout=TIMEOUT_S) as http:
        while not stop.is_set():
            try:
                statuses.append(http.get(path).status_code)
            except httpx.HTTPError as exc:  # a timeout (hung) or a dropped connection
                statuses.append(type(exc).__name__)
                return


def test_health_and_metrics_under_sixteen_starting_and_stopping_streams(server: LiveServer) -> None:
    stop = threading.Event()
    polled: dict[str, list[int | str]] = {"/health": [], "/metrics": []}
    pollers = [
        threading.Thread(target=hammer, args=(server.base_url, path, stop, polled[path]), daemon=True)
        for path in ("/health", "/metrics", "/health", "/metrics")
    ]
    for thread in pollers:
        thread.start()

    def client(i: int) -> list[dict[str, Any]]:
        with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=TIMEOUT_S) as http:
            return [one_stream(http, i, r, cancel=(i + r) % 3 == 0) for r in range(ROUNDS)]

    try:
        with ThreadPoolExecutor(STREAMS) as pool:
            results = [r for rs in pool.map(client, range(STREAMS)) for r in rs]
    finally:
        stop.set()
        for thread in pollers:
            thread.join(timeout=TIMEOUT_S)
    assert not any(thread.is_alive() for thread in pollers), "a /health or /metrics request hung"

    counts = {path: len(statuses) for path, statuses in polled.items()}
    n_cancelled = sum(r.get("cancelled", False) for r in results)
    print(f"\nload: {len(results)} streams ({n_cancelled} cancelled), requests {counts}")
    assert len(results) == STREAMS * ROUNDS
    bad = [r for r in results if r["status"] != 200]
    assert not bad, f"{len(bad)} streams refused: {bad[:3]}"
    cancelled = [r for r in results if r["cancelled"]]
    finished = [r for r in results if not r["cancelled"]]
    assert cancelled and finished
    for result in finished:
        data = result["data"]
        assert data[-1] == "[DONE]", data[-3:]
        chunks = [json.loads(d) for d in data[:-1]]
        assert not [c for c in chunks if "error" in c], chunks
        usage = chunks[-1]["usage"]
        finish = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
        assert finish in (["length"], ["stop"])
        assert usage["completion_tokens"] == MAX_TOKENS or finish == ["stop"]
    for path, statuses in polled.items():
        assert statuses, f"{path} was never answered"
        assert set(statuses) == {200}, f"{path}: {sorted(set(statuses), key=str)}"

    # Every cancelled stream was aborted, not left running: the engine goes idle.
    deadline = time.monotonic() + TIMEOUT_S
    with httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=TIMEOUT_S) as http:
        while True:
            engine = http.get("/health").json()["engine"]
            if (engine["running"], engine["waiting"]) == (0, 0) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert (engine["running"], engine["waiting"]) == (0, 0), engine
        metrics = http.get("/metrics").text
    served = [line for line in metrics.splitlines() if line.startswith("qwenkit_requests_total{")]
    assert served and not [line for line in served if 'status="5' in line], served
