"""Hostile and broken requests against a real server with an API key: each gets a 4xx with the right
OpenAI error type and a short message, no path variant gets past the key, and the server keeps serving."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from qwenkit.serve.config import ServeConfig
from serve_fixtures import API_KEY, MODEL, LiveServer, live_server

N_CTX = 1024
AUTH = {"Authorization": f"Bearer {API_KEY}"}
OK_MESSAGES = [{"role": "user", "content": "hi"}]
RECURSIVE = {
    "$defs": {"node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}}}},
    "$ref": "#/$defs/node",
}


@pytest.fixture(scope="module")
def server(demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path]) -> Iterator[LiveServer]:
    # Many wrong keys on purpose below: the lockout is tested on its own (test_serve_protocol).
    config = ServeConfig(
        api_keys=(API_KEY,),  # type: ignore[arg-type]
        max_body_bytes=1024 * 1024,
        auth_failures_per_minute=10_000,
    )
    gguf, checkpoint = demo_gguf("qwen3", "tiny", "f32"), demo_checkpoint("qwen3", "tiny")
    with live_server(gguf, checkpoint, config, n_ctx=N_CTX, max_seqs=2) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def raw(server: LiveServer, target: str, method: str = "GET", headers: dict[str, str] | None = None) -> int:
    """Send a request line exactly as written (no client-side path normalisation); the status code."""
    host, port = server.base_url.removeprefix("http://").split(":")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close", "Content-Length: 0"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = sock.recv(4096).decode("latin-1")
    return int(head.split(" ", 2)[1])


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": OK_MESSAGES, "max_tokens": 2, **fields}


def tool(name: str = "f", parameters: Any = None) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": name}
    if parameters is not None:
        fn["parameters"] = parameters
    return {"type": "function", "function": fn}


JSON_CASES: list[tuple[str, str, Any, int]] = [
    # (name, path, JSON body, status)
    ("array body", "/v1/chat/completions", [], 400),
    ("string body", "/v1/chat/completions", "hello", 400),
    ("messages not a list", "/v1/chat/completions", chat(messages="hi"), 400),
    ("empty messages", "/v1/chat/completions", chat(messages=[]), 400),
    ("message not an object", "/v1/chat/completions", chat(messages=["hi"]), 400),
    ("unknown role", "/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), 400),
    ("missing role", "/v1/chat/completions", chat(messages=[{"content": "x"}]), 400),
    ("content a number", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]), 400),
    (
        "image content part",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        400,
    ),
    (
        "tool_calls on a user",
        "/v1/chat/completions",
        chat(
            messages=[
                {
                    "role": "user",
                    "content": "x",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
                }
            ]
        ),
        400,
    ),
    ("model a number", "/v1/chat/completions", chat(model=5), 400),
    ("no model", "/v1/chat/completions", {"messages": OK_MESSAGES}, 400),
    ("unknown model", "/v1/chat/completions", chat(model="gpt-4o"), 404),
    ("temperature a string", "/v1/chat/completions", chat(temperature="hot"), 400),
    ("temperature too high", "/v1/chat/completions", chat(temperature=5), 400),
    ("top_p zero", "/v1/chat/completions", chat(top_p=0), 400),
    ("top_k a float", "/v1/chat/completions", chat(top_k=2.5), 400),
    ("n a million", "/v1/chat/completions", chat(n=10**6), 400),
    ("n zero", "/v1/chat/completions", chat(n=0), 400),
    ("max_tokens negative", "/v1/chat/completions", chat(max_tokens=-1), 400),
    ("max_tokens 10^9", "/v1/chat/completions", chat(max_tokens=10**9), 400),
    ("max_tokens a string", "/v1/chat/completions", chat(max_tokens="10"), 400),
    ("max_tokens a bool", "/v1/chat/completions", chat(max_tokens=True), 400),
    ("top_logprobs 50", "/v1/chat/completions", chat(logprobs=True, top_logprobs=50), 400),
    ("top_logprobs without logprobs", "/v1/chat/completions", chat(top_logprobs=2), 400),
    ("logprobs a string", "/v1/chat/completions", chat(logprobs="yes"), 400),
    ("17 stop strings", "/v1/chat/completions", chat(stop=[f"s{i}" for i in range(17)]), 400),
    ("huge stop string", "/v1/chat/completions", chat(stop="x" * 5000), 400),
    ("empty stop string", "/v1/chat/completions", chat(stop=[""]), 400),
    ("seed a string", "/v1/chat/completions", chat(seed="abc"), 400),
    ("seed past int64", "/v1/chat/completions", chat(seed=2**70), 400),
    ("stream a string", "/v1/chat/completions", chat(stream="yes"), 400),
    (
        "prompt 10x the context",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": "hello " * (10 * N_CTX)}]),
        400,
    ),
    ("unknown response_format", "/v1/chat/completions", chat(response_format={"type": "yaml"}), 400),
    (
        "json_schema without schema object",
        "/v1/chat/completions",
        chat(response_format={"type": "json_schema"}),
        400,
    ),
    (
        "schema pointing nowhere",
        "/v1/chat/completions",
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}},
            }
        ),
        400,
    ),
    (
        "schema not an object",
        "/v1/chat/completions",
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
        400,
    ),
    (
        "recursive schema",
        "/v1/chat/completions",
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": RECURSIVE}}),
        400,
    ),
    ("recursive tool schema", "/v1/chat/completions", chat(tools=[tool("walk", RECURSIVE)]), 400),
    (
        "remote $ref in a tool",
        "/v1/chat/completions",
        chat(tools=[tool("f", {"$ref": "https://evil.example/s.json"})]),
        400,
    ),
    ("flat tool", "/v1/chat/completions", chat(tools=[{"name": "f"}]), 400),
    ("duplicate tool names", "/v1/chat/completions", chat(tools=[tool("f"), tool("f")]), 400),
    ("200 tools", "/v1/chat/completions", chat(tools=[tool(f"f{i}") for i in range(200)]), 400),
    (
        "unknown tool_choice name",
        "/v1/chat/completions",
        chat(tools=[tool("f")], tool_choice={"type": "function", "function": {"name": "g"}}),
        400,
    ),
    ("tool_choice nonsense", "/v1/chat/completions", chat(tools=[tool("f")], tool_choice="sometimes"), 400),
    ("required without tools", "/v1/chat/completions", chat(tool_choice="required"), 400),
    (
        "json format and forced tools",
        "/v1/chat/completions",
        chat(tools=[tool("f")], tool_choice="required", response_format={"type": "json_object"}),
        400,
    ),
    (
        "unknown chat_template_kwargs",
        "/v1/chat/completions",
        chat(chat_template_kwargs={"add_vision_id": True}),
        400,
    ),
    (
        "enable_thinking a string",
        "/v1/chat/completions",
        chat(chat_template_kwargs={"enable_thinking": "yes"}),
        400,
    ),
    ("request chat template", "/v1/chat/completions", chat(chat_template="{{ messages }}"), 400),
    ("logit_bias key not a token id", "/v1/chat/completions", chat(logit_bias={"abc": 5}), 400),
    ("ignore_eos a string", "/v1/chat/completions", chat(ignore_eos="yes"), 400),
    ("thinking_budget zero", "/v1/chat/completions", chat(thinking_budget=0), 400),
    ("completion prompt a number", "/v1/completions", {"model": MODEL, "prompt": 5}, 400),
    ("completion prompt empty", "/v1/completions", {"model": MODEL, "prompt": ""}, 400),
    ("completion token-id prompt", "/v1/completions", {"model": MODEL, "prompt": [1, 2, 3]}, 400),
    ("completion suffix", "/v1/completions", {"model": MODEL, "prompt": "a", "suffix": "b"}, 400),
    ("completion too many prompts", "/v1/completions", {"model": MODEL, "prompt": ["a"] * 9}, 400),
]


@pytest.mark.parametrize(("name", "path", "body", "status"), JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_bad_json_requests(http: httpx.Client, name: str, path: str, body: Any, status: int) -> None:
    response = http.post(path, json=body, headers=AUTH)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert 0 < len(error["message"]) <= 300


RAW_CASES: list[tuple[str, bytes, dict[str, str], int]] = [
    ("not JSON", b"hello", {}, 400),
    ("empty body", b"", {}, 400),
    ("truncated JSON", b'{"model": ', {}, 400),
    (
        "invalid UTF-8",
        b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        {},
        400,
    ),
    (
        "raw NUL bytes",
        b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "a\x00b"}]}',
        {},
        400,
    ),
    (
        "lone surrogate escape",
        b'{"model": "q", "messages": [{"role": "user", "content": "\\ud800"}]}',
        {},
        400,
    ),
    ("deeply nested JSON", b'{"model": "q", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400),
    ("NaN temperature", b'{"model": "q", "messages": [], "temperature": NaN}', {}, 400),
    (
        "5 MB body",
        b'{"model": "q", "messages": [{"role": "user", "content": "' + b"a" * 5_000_000 + b'"}]}',
        {},
        413,
    ),
    ("text/plain", json.dumps(chat()).encode(), {"content-type": "text/plain"}, 415),
    ("form encoded", b"model=q", {"content-type": "application/x-www-form-urlencoded"}, 415),
]


@pytest.mark.parametrize(("name", "data", "headers", "status"), RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_bad_raw_bodies(
    http: httpx.Client, name: str, data: bytes, headers: dict[str, str], status: int
) -> None:
    all_headers = {"content-type": "application/json", **AUTH, **headers}
    response = http.post("/v1/chat/completions", content=data, headers=all_headers)
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and len(error["message"]) <= 300


def test_keys_are_required_everywhere_but_health(server: LiveServer, http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    assert http.get("/v1/models", headers=AUTH).status_code == 200
    for headers in (
        {},
        {"Authorization": "Bearer wrong-key-123"},
        {"Authorization": API_KEY},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": f"Bearer {API_KEY}x"},
        {"X-Api-Key": API_KEY},
    ):
        response = http.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    response = http.post("/v1/chat/completions", json=chat())
    assert response.status_code == 401
    variants = [
        "/v1/models/",
        "//v1/models",
        "/v1//models",
        "/V1/models",
        "/v1/MODELS",
        "/v1/%6dodels",
        "/%761/models",
        "/v1/models%2F",
        "/v1/./models",
        "/v1/../v1/models",
        "/health/../v1/models",
        "/health/",
        "/health%2F..%2Fv1%2Fmodels",
        "/HEALTH",
        "//health",
        "/metrics",
        "/metrics/",
        "/docs",
        "/openapi.json",
        "/nope",
        "/v1/chat/completions/",
        "/v1/models?x=/health",
        "http://127.0.0.1/v1/models",
        "/v1/models;health",
    ]
    for target in variants:
        assert raw(server, target) == 401, target
        assert raw(server, target, "POST") == 401, target
    assert raw(server, "/v1/models", headers=AUTH) == 200
    assert raw(server, "/health") == 200


def test_bad_content_length(server: LiveServer) -> None:
    # Unparseable or lying lengths never reach a route (the HTTP parser or the body reader refuses them).
    assert 400 <= raw(server, "/v1/models", headers={**AUTH, "Content-Length": "abc"}) < 500


def test_error_routes_with_the_key(http: httpx.Client) -> None:
    missing = http.post("/v1/nope", json={}, headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
    wrong_method = http.get("/v1/chat/completions", headers=AUTH)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_still_serving_after_all_that(http: httpx.Client, server: LiveServer) -> None:
    response = http.post("/v1/chat/completions", json=chat(max_tokens=4), headers=AUTH)
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )
    assert http.get("/health").json()["status"] == "ok"
    metrics = http.get("/metrics", headers=AUTH).text
    for reason in ("auth", "invalid", "body_too_large", "content_type", "not_found", "too_long"):
        assert f'qwenkit_rejected_requests_total{{reason="{reason}"}}' in metrics, reason
