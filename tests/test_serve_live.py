"""The official `openai` client against a real server (uvicorn on 127.0.0.1, llama.cpp, the tiny demo
model): chat, streams, tools round trip, json_schema, reasoning fields, completions, errors as the
client's exceptions, 16 concurrent streams, and disconnects that free their slot."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from serve_fixtures import API_KEY, MODEL, WEATHER, LiveServer, keyed_server

NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
SCHEMA = {
    "type": "object",
    # (llama-cpp-python's schema converter ignores integer minimum/maximum, so bounds come from an enum)
    "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


server = keyed_server(16384)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def user(text: str = "Hello there") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def wait_idle(server: LiveServer) -> Any:
    """Engine stats once nothing runs or waits (the test fails after a minute otherwise)."""
    deadline = time.monotonic() + 60
    while True:
        stats = server.engine.stats()
        if (stats.running, stats.waiting) == (0, 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def collect(stream: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "content": "",
        "reasoning_content": "",
        "reasoning": "",
        "finish": None,
        "usage": None,
    }
    calls: dict[int, dict[str, str]] = {}
    for chunk in stream:
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            out["content"] += delta.content or ""
            extra = delta.model_extra or {}
            out["reasoning_content"] += extra.get("reasoning_content") or ""
            out["reasoning"] += extra.get("reasoning") or ""
            for call in delta.tool_calls or []:
                slot = calls.setdefault(call.index, {"name": "", "arguments": ""})
                slot["name"] += call.function.name or ""
                slot["arguments"] += call.function.arguments or ""
            out["finish"] = choice.finish_reason or out["finish"]
    out["tool_calls"] = [calls[i] for i in sorted(calls)]
    return out


def test_models_and_a_chat_completion(client: openai.OpenAI, server: LiveServer) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    response = client.chat.completions.create(model=MODEL, messages=user(), max_tokens=8, seed=1)
    choice = response.choices[0]
    assert response.model == MODEL and response.object == "chat.completion"
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert response.usage is not None and 0 < response.usage.completion_tokens <= 8
    assert response.usage.prompt_tokens > 0


def test_stream_equals_non_stream(client: openai.OpenAI) -> None:
    args = {
        "model": MODEL,
        "messages": user("Count to five"),
        "max_tokens": 12,
        "temperature": 0,
        "extra_body": NO_THINK,
    }
    whole = client.chat.completions.create(**args)
    streamed = collect(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert streamed["content"] == (whole.choices[0].message.content or "")
    assert streamed["finish"] == whole.choices[0].finish_reason == "length"
    assert streamed["usage"].completion_tokens == whole.usage.completion_tokens == 12  # type: ignore[union-attr]


def test_penalties_reach_the_real_engine(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=user("Repeat after me"),
        max_tokens=8,
        presence_penalty=1.5,
        frequency_penalty=0.5,
        extra_body={**NO_THINK, "repetition_penalty": 1.2},
    )
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage is not None and 0 < response.usage.completion_tokens <= 8


def test_json_schema_with_thinking_and_both_reasoning_fields(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    args = {
        "model": MODEL,
        "messages": user("Is it ok?"),
        "max_tokens": 120,
        "seed": 7,
        "response_format": fmt,
        "extra_body": {"thinking_budget": 4},
    }
    response = client.chat.completions.create(**args)
    message = response.choices[0].message
    extra = message.model_extra or {}
    assert extra["reasoning_content"] and extra["reasoning_content"] == extra["reasoning"]
    answer = json.loads(message.content or "")
    assert set(answer) == {"ok", "n"} and isinstance(answer["ok"], bool) and answer["n"] in (1, 2, 3)
    assert response.choices[0].finish_reason == "stop"
    # usage counts the reasoning tokens (at most the budget), as OpenAI's reasoning models report them.
    details = response.usage.completion_tokens_details if response.usage else None
    assert details is not None and 1 <= (details.reasoning_tokens or 0) <= 4
    streamed = collect(client.chat.completions.create(**args, stream=True))
    assert streamed["reasoning_content"] == streamed["reasoning"] == extra["reasoning_content"]
    assert streamed["content"] == message.content


def test_json_object_without_thinking(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    response = client.chat.completions.create(
        model=MODEL,
        messages=user(),
        max_tokens=60,
        response_format=fmt,
        extra_body=NO_THINK,  # type: ignore[arg-type]
    )
    assert isinstance(json.loads(response.choices[0].message.content or ""), dict)
    details = response.usage.completion_tokens_details if response.usage else None
    assert details is not None and details.reasoning_tokens == 0


def test_tools_round_trip(client: openai.OpenAI) -> None:
    messages: list[Any] = user("What is the weather in Paris?")
    first = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        max_tokens=80,
        extra_body=NO_THINK,  # type: ignore[list-item]
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert calls and all(c.id.startswith("call_") for c in calls)
    for call in calls:
        arguments = json.loads(call.function.arguments)
        assert call.function.name in ("get_weather", "get_time")
        if call.function.name == "get_weather":
            assert arguments["city"] in ("Paris", "Rome")
    messages.append(choice.message.model_dump(exclude_none=True))
    messages += [{"role": "tool", "tool_call_id": c.id, "content": "sunny, 21 C"} for c in calls]
    second = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER, CLOCK], max_tokens=8
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage is not None and second.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]

    named = {"type": "function", "function": {"name": "get_time"}}
    streamed = collect(
        client.chat.completions.create(
            model=MODEL,
            messages=user(),
            tools=[WEATHER, CLOCK],
            tool_choice=named,
            max_tokens=60,  # type: ignore[arg-type]
            stream=True,
            extra_body=NO_THINK,
        )
    )
    assert [c["name"] for c in streamed["tool_calls"]] == ["get_time"]
    assert isinstance(json.loads(streamed["tool_calls"][0]["arguments"]), dict)
    assert streamed["finish"] == "tool_calls"


def test_completions(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, logprobs=2, seed=3
    )
    choice = response.choices[0]
    assert (
        response.usage is not None
        and response.usage.completion_tokens == 6
        and choice.finish_reason == "length"
    )
    assert choice.logprobs is not None and len(choice.logprobs.tokens or []) == 6
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=6, seed=3, stream=True
        )
        if c.choices
    )
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, seed=3)
    assert streamed == again.choices[0].text


def test_errors_are_the_clients_exceptions(client: openai.OpenAI, server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    assert bad.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=user(), max_tokens=4, n=1000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=user(), max_tokens=4)
    wrong = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-wrong-key-123", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model=MODEL, messages=user("hello " * 20_000), max_tokens=4)
    assert long.value.code == "context_length_exceeded"


def test_sixteen_concurrent_streams_complete(client: openai.OpenAI, server: LiveServer) -> None:
    def one(i: int) -> dict[str, Any]:
        stream = client.chat.completions.create(
            model=MODEL,
            messages=user(f"Story number {i}"),
            max_tokens=10,
            temperature=0,
            extra_body=NO_THINK,
            stream=True,
            stream_options={"include_usage": True},
        )
        return collect(stream)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    for i, got in enumerate(results):
        assert got["finish"] in ("stop", "length") and got["usage"] is not None
        assert got["usage"].completion_tokens == 10 or got["finish"] == "stop"
        alone = client.chat.completions.create(
            model=MODEL, messages=user(f"Story number {i}"), max_tokens=10, temperature=0, extra_body=NO_THINK
        )
        assert got["content"] == (alone.choices[0].message.content or "")
    assert wait_idle(server).kv_used <= server.engine.n_ctx


# Greedy decoding of the demo model loops on one word and never stops by itself: a long generation.
ENDLESS = {"model": MODEL, "prompt": "tell me a secret story", "temperature": 0}


def test_disconnect_mid_stream_frees_the_slot(server: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    steps_before = wait_idle(server).steps
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http:
        body = {**ENDLESS, "max_tokens": 8000, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            chunks = 0
            for line in response.iter_lines():
                chunks += line.startswith("data: ")
                if chunks >= 3:
                    break
            assert server.engine.stats().running == 1
        # Leaving the block closed the connection mid-stream.
        stats = wait_idle(server)
        assert (stats.running, stats.waiting) == (0, 0)
        assert stats.steps - steps_before < 8000  # aborted, not run to max_tokens
        assert http.get("/health").json()["engine"]["running"] == 0


def test_disconnect_while_waiting_for_a_whole_response_frees_the_slot(server: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    steps_before = wait_idle(server).steps
    with (
        httpx.Client(base_url=server.base_url, headers=headers, timeout=1.0) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post("/v1/completions", json={**ENDLESS, "max_tokens": 16000})
    stats = wait_idle(server)
    assert (stats.running, stats.waiting) == (0, 0)
    assert stats.steps - steps_before < 16000


def test_health_is_public_and_metrics_are_not(server: LiveServer) -> None:
    assert httpx.get(server.base_url + "/health").json()["status"] == "ok"
    assert httpx.get(server.base_url + "/metrics").status_code == 401
    text = httpx.get(server.base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert 'qwenkit_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'qwenkit_rejected_requests_total{reason="auth"}' in text
