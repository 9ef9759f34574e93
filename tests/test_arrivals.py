"""Bursts start together: the server counts generating requests until they are submitted (Arrivals), and an
idle llama.cpp engine waits for that count before its first step. Checked on the real engine (the tiny
qwen3 demo) and through the app, where every way a request ends leaves the count."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from qwenkit.engines.arrivals import Arrivals, WatchesArrivals
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.engines.request import GenerationRequest, TokenEvent
from qwenkit.engines.sampling import SamplingParams
from qwenkit.serve.app import serve_context
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import MODEL, demo_app, demo_engine, in_process

GREEDY = SamplingParams(temperature=0.0, max_tokens=4)


@pytest.fixture(scope="module")
def engine(demo_gguf: Callable[..., Path]) -> Iterator[LlamaCppEngine]:
    """One engine for the module; each test gives it its own Arrivals (watch_arrivals)."""
    eng = demo_engine(demo_gguf("qwen3", "tiny", "f32"), n_ctx=2048, max_seqs=8)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint: Callable[..., Path]) -> QwenTokenizer:
    return QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny"))


def prompt(seed: int) -> tuple[int, ...]:
    return tuple(1000 + (seed * 7919 + i * 104729) % 100000 for i in range(10))


def record_steps(engine: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of sequences each llama_decode call produced logits for, in order."""
    outputs: list[int] = []
    decode = engine.model.decode

    def counted(tokens: Any, positions: Any, seq_ids: Any, wants: Any) -> int:
        outputs.append(sum(bool(w) for w in wants))
        return decode(tokens, positions, seq_ids, wants)

    monkeypatch.setattr(engine.model, "decode", counted)
    return outputs


def test_arrival_leaves_once() -> None:
    arrivals = Arrivals()
    a, b = arrivals.enter(), arrivals.enter()
    assert arrivals.pending() == 2
    a.leave()
    a.leave()
    assert arrivals.pending() == 1
    with b:
        pass
    b.leave()
    assert arrivals.pending() == 0


def test_an_idle_engine_waits_for_requests_still_on_their_way(
    engine: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrivals = Arrivals()
    engine.watch_arrivals(arrivals, max_wait=60.0)
    steps = record_steps(engine, monkeypatch)
    engine.start()
    done = threading.Semaphore(0)

    def sink(event: TokenEvent) -> None:
        if event.finished:
            done.release()

    on_its_way = arrivals.enter()
    engine.submit(GenerationRequest("a", prompt(1), GREEDY), sink)
    assert not done.acquire(timeout=0.3)  # without the wait, "a" (4 tokens) would be done by now
    engine.submit(GenerationRequest("b", prompt(2), GREEDY), sink)
    on_its_way.leave()
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    assert steps[0] == 2  # both prompts in the first step
    assert engine.stats().waiting == 0


def test_the_wait_ends_at_its_limit(engine: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    arrivals = Arrivals()
    arrivals.enter()  # never leaves (a server bug): the engine still serves, after max_wait
    engine.watch_arrivals(arrivals, max_wait=0.05)
    engine.start()
    events = list(engine.generate_sync(GenerationRequest("late", prompt(3), GREEDY)))
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 4


def test_a_burst_through_the_app_starts_in_one_step(
    engine: LlamaCppEngine, tokenizer: QwenTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight concurrent streaming requests through the ASGI app: every prompt is in the engine's first
    step, and the count is back to 0 afterwards, also for requests refused before or at the engine."""
    app = demo_app(engine, tokenizer, manage_engine=False)
    assert isinstance(engine, WatchesArrivals)
    ctx = serve_context(app)
    engine.watch_arrivals(ctx.arrivals, max_wait=60.0)  # generous: a slow CI machine must not split it
    steps = record_steps(engine, monkeypatch)

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "stream": True}
            sends = [client.post("/v1/completions", json={**body, "prompt": f"burst {i}"}) for i in range(8)]
            return await asyncio.gather(*sends)

    with in_process(app) as client:  # runs the lifespan (starts the engine)
        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * 8
        assert all(r.text.rstrip().endswith("data: [DONE]") for r in responses)
        assert steps[0] == 8
        bad = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1})
        too_long = client.post("/v1/completions", json={"model": MODEL, "prompt": "x " * 3000})
        assert bad.status_code == 400 and too_long.status_code == 400
        assert client.post("/v1/completions", content=b"{").status_code == 400
        ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200
        assert ctx.arrivals.pending() == 0
