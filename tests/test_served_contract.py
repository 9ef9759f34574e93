"""The server's protocol contract checked over HTTP against whatever engine serves it: the llama.cpp demo
server here, or the server at QWENKIT_TEST_URL (benchmarks/gpu.sh points it at `qwenkit serve --engine
vllm`), so the same checks prove an engine behind the protocol changes nothing the client sees.

Checks: greedy stream == non-stream, usage == logprob entries <= max_tokens, max_tokens=1 ends with
"length", stop strings never appear, a JSON schema is honoured, n=2, a client that hangs up frees the
engine. QWENKIT_TEST_API_KEY is sent when set.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_fixtures import live_server

NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
CITY = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def api(demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path]) -> Iterator[httpx.Client]:
    url = os.environ.get("QWENKIT_TEST_URL")
    key = os.environ.get("QWENKIT_TEST_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if url:
        with httpx.Client(base_url=url.rstrip("/").removesuffix("/v1"), headers=headers, timeout=120) as c:
            yield c
        return
    gguf, checkpoint = demo_gguf("qwen3", "tiny", "f32"), demo_checkpoint("qwen3", "tiny")
    with (
        live_server(gguf, checkpoint, n_ctx=2048) as live,
        httpx.Client(base_url=live.base_url, timeout=120) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def model(api: httpx.Client) -> str:
    return api.get("/v1/models").json()["data"][0]["id"]


def chat(model: str, text: str = "Name a city.", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **NO_THINK, **kw}


def stream(api: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    with api.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_greedy_stream_equals_whole(api: httpx.Client, model: str) -> None:
    body = chat(model, temperature=0, max_tokens=24, seed=1)
    whole = api.post("/v1/chat/completions", json=body).json()
    chunks = stream(api, {**body, "stream_options": {"include_usage": True}})
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


def test_usage_matches_logprobs_and_max_tokens(api: httpx.Client, model: str) -> None:
    body = chat(model, max_tokens=12, logprobs=True, top_logprobs=2, seed=3)
    answer = api.post("/v1/chat/completions", json=body).json()
    choice, usage = answer["choices"][0], answer["usage"]
    entries = choice["logprobs"]["content"]
    assert usage["completion_tokens"] == len(entries) <= 12
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in entries)
    one = api.post("/v1/chat/completions", json=chat(model, max_tokens=1, min_tokens=1)).json()
    assert one["choices"][0]["finish_reason"] == "length" and one["usage"]["completion_tokens"] == 1


def test_stop_strings_never_appear(api: httpx.Client, model: str) -> None:
    for seed in range(3):
        answer = api.post(
            "/v1/chat/completions", json=chat(model, max_tokens=40, stop=["e"], seed=seed)
        ).json()
        assert "e" not in answer["choices"][0]["message"]["content"]


def test_json_schema_is_honoured(api: httpx.Client, model: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    answer = api.post("/v1/chat/completions", json=chat(model, max_tokens=40, response_format=fmt)).json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert json.loads(choice["message"]["content"])["city"] in ("Paris", "Rome")


def test_n_choices(api: httpx.Client, model: str) -> None:
    answer = api.post("/v1/chat/completions", json=chat(model, max_tokens=4, n=2)).json()
    assert [c["index"] for c in answer["choices"]] == [0, 1]


def test_a_client_that_hangs_up_frees_the_engine(api: httpx.Client, model: str) -> None:
    body = chat(model, max_tokens=400, min_tokens=400)
    with api.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 30
    while api.get("/health").json()["engine"]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert api.get("/health").json()["engine"]["running"] == 0
