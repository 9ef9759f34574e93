"""`qwenkit serve --replicas N`: llama.cpp engine replicas on Ray Serve behind one qwenkit endpoint.

The end-to-end test starts a local Ray with 2 replicas of the tiny demo engine (1 thread each) and runs
the real server over them through the Engine protocol; it is slow (Ray and Serve take ~20 s to start on
a small machine). Skipped without the `ray` extra.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.replicas import check_ray_address
from qwenkit.engines.request import GenerationRequest
from qwenkit.engines.sampling import SamplingParams
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import MODEL, demo_app, demo_engine, in_process


def test_a_ray_address_that_does_not_answer_is_one_line() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match=r"no Ray cluster answers at 127\.0\.0\.1") as info:
        check_ray_address(f"127.0.0.1:{port}", timeout=1)
    assert "\n" not in str(info.value) and "ray start --head" in str(info.value)
    with pytest.raises(ValueError, match="host:port"):
        check_ray_address("nonsense")


def test_the_router_offers_every_replica_as_one_rank() -> None:
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    from qwenkit.engines.ray_router import LeastLoadedRouter

    choose = LeastLoadedRouter.choose_replicas
    assert asyncio.run(choose(None, ["a", "b", "c"])) == [["a", "b", "c"]]  # type: ignore[arg-type]
    assert asyncio.run(choose(None, [])) == []  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def replicas(demo_gguf: Callable[..., Path]) -> Iterator[object]:
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    from qwenkit.engines.replicas import start_replicas

    config = EngineConfig.for_workload(2, 512, threads=1, max_waiting=8)
    engine = start_replicas(demo_gguf("qwen3", "tiny", "f32"), config, replicas=2)
    try:
        yield engine
    finally:
        engine.shutdown(timeout=5)


@pytest.mark.slow
def test_two_replicas_serve_one_endpoint(
    replicas: object, demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path]
) -> None:
    from ray import serve

    from qwenkit.engines.replicas import APP_NAME, ReplicaEngine

    assert isinstance(replicas, ReplicaEngine)
    status = serve.status().applications[APP_NAME].deployments["engine"]
    assert status.replica_states.get("RUNNING") == 2
    tokenizer = QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny"))
    prompt = tuple(tokenizer.encode("Count: one two three"))
    greedy = SamplingParams(temperature=0.0, max_tokens=24)

    async def run(engine: object, rid: str) -> list[int]:
        ids: list[int] = []
        async for event in engine.generate(GenerationRequest(rid, prompt, greedy)):  # type: ignore[attr-defined]
            ids += event.token_ids
        return ids

    async def many(engine: object, n: int) -> list[list[int]]:
        return await asyncio.gather(*(run(engine, f"r{i}") for i in range(n)))

    single = demo_engine(demo_gguf("qwen3", "tiny", "f32"), 512, 2)
    single.start()
    try:
        expected = asyncio.run(many(single, 1))[0]
    finally:
        single.shutdown()
    answers = asyncio.run(many(replicas, 4))  # 4 at once over 2 replicas of 2 slots
    assert answers == [expected] * 4

    async def abort_midway() -> str | None:
        request = GenerationRequest("held", prompt, SamplingParams(temperature=0.0, max_tokens=400))
        last = None
        async for event in replicas.generate(request):  # type: ignore[attr-defined]
            if event.completion_tokens >= 2 and not event.finished:
                replicas.abort("held")  # type: ignore[attr-defined]
            last = event.finish_reason
        return last

    assert asyncio.run(abort_midway()) == "abort"

    async def probe_while_busy() -> list[int]:
        # One replica runs a long request; calls routed least-loaded all reach the idle one.
        request = GenerationRequest("busy", prompt, SamplingParams(temperature=0.0, max_tokens=480))
        running: list[int] = []
        async for _event in replicas.generate(request):  # type: ignore[attr-defined]
            if not running:
                for _ in range(4):
                    info = await replicas._handle.info.remote()  # type: ignore[attr-defined]
                    running.append(info["stats"].running)
                    await asyncio.sleep(0.2)  # Serve counts a finished call as ongoing for a moment
                replicas.abort("busy")  # type: ignore[attr-defined]
        return running

    assert asyncio.run(probe_while_busy()) == [0, 0, 0, 0]
    assert replicas.stats().running == 0

    # The server, unchanged, on the replicas.
    with in_process(demo_app(replicas, tokenizer, manage_engine=False)) as http:  # type: ignore[arg-type]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: {")]
        whole = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and lines and json.loads(lines[-1][6:])["choices"]
    assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.slow
def test_cli_serve_replicas(demo_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """`qwenkit serve --replicas 2` end to end: it starts, answers, and stops on SIGTERM with exit 0."""
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    model = str(demo_checkpoint("qwen3", "tiny"))
    args = ["serve", "--model", model, "--replicas", "2", "--threads", "1", "--max-seqs", "2", "--port", "0"]
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qwenkit", *args, "--ctx", "1024", "--quant", "f32"],
            stderr=sink,
            stdout=subprocess.DEVNULL,
            env={**os.environ, "COLUMNS": "300"},
        )
    try:
        url = None
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", log.read_text())
            url = found.group(1) if found else None
            time.sleep(0.2)
        assert url is not None, log.read_text()
        deadline = time.monotonic() + 60
        while True:
            try:
                name = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["id"]
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=90)
    assert code == 0, log.read_text()
