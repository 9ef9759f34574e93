"""The official `anthropic` client against a real server (uvicorn on 127.0.0.1, llama.cpp, the tiny demo
model) on /v1/messages: create and stream (the same blocks), system prompts, multi-turn, tools with
tool_use / tool_result blocks, thinking blocks on and off, stop_sequences, count_tokens, x-api-key auth,
and bad input answered in Anthropic's error shape while the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from qwenkit.serve.config import ServeConfig
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import (
    API_KEY,
    MODEL,
    FakeEngine,
    LiveServer,
    fake_app,
    in_process,
    keyed_server,
)

WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
CLOCK = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
GREEDY = {"temperature": 0}
BEARER = {
    "Authorization": f"Bearer {API_KEY}"
}  # the SDK no longer names sampling fields; the API still takes them


server = keyed_server(16384)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> anthropic.Anthropic:
    # The SDK sends the key as x-api-key.
    return anthropic.Anthropic(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def user(text: str = "Hello there") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def blocks(message: Any) -> list[dict[str, Any]]:
    return [b.model_dump(exclude_none=True) for b in message.content]


def test_create_and_stream_give_the_same_message(client: anthropic.Anthropic) -> None:
    args: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 12,
        "system": "Answer briefly.",
        "messages": user("Count to five"),
        "extra_body": GREEDY,
    }
    whole = client.messages.create(**args)
    assert whole.type == "message" and whole.role == "assistant" and whole.model == MODEL
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 12
    assert [b.type for b in whole.content] == ["text"] and whole.content[0].text  # type: ignore[union-attr]
    with client.messages.stream(**args) as stream:
        text = "".join(stream.text_stream)
        streamed = stream.get_final_message()
    assert text == whole.content[0].text  # type: ignore[union-attr]
    assert blocks(streamed) == blocks(whole)
    assert streamed.stop_reason == "max_tokens" and streamed.usage.output_tokens == 12


def test_system_blocks_and_multi_turn_reach_the_prompt(client: anthropic.Anthropic) -> None:
    one = client.messages.count_tokens(model=MODEL, messages=user("Hi"))
    with_system = client.messages.count_tokens(
        model=MODEL,
        system=[{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Never apologise."}],
        messages=user("Hi"),
    )
    turns = [*user("Hi"), {"role": "assistant", "content": "Hello!"}, *user("And again?")]
    multi = client.messages.count_tokens(model=MODEL, messages=turns)
    assert with_system.input_tokens > one.input_tokens and multi.input_tokens > one.input_tokens
    answer = client.messages.create(model=MODEL, max_tokens=4, messages=turns)
    assert answer.usage.input_tokens + (answer.usage.cache_read_input_tokens or 0) == multi.input_tokens


def test_count_tokens_equals_the_rendered_prompt(client: anthropic.Anthropic, server: LiveServer) -> None:
    messages = user("What is the weather in Paris?")
    counted = client.messages.count_tokens(
        model=MODEL, system="Be helpful.", messages=messages, tools=[WEATHER]
    )
    # The same prompt through the OpenAI route: one native renderer, so one token count.
    function = {
        "name": "get_weather",
        "description": WEATHER["description"],
        "parameters": WEATHER["input_schema"],
    }
    openai_tools = [{"type": "function", "function": function}]
    body = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "Be helpful."}, *messages],
        "tools": openai_tools,
        "max_tokens": 1,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    reply = httpx.post(server.base_url + "/v1/chat/completions", json=body, headers=BEARER, timeout=60)
    assert reply.status_code == 200, reply.text
    assert counted.input_tokens == reply.json()["usage"]["prompt_tokens"]


def test_tool_use_and_tool_result_round_trip(client: anthropic.Anthropic) -> None:
    messages: list[Any] = user("What is the weather in Paris?")
    # Greedy and one call: sampled parallel calls from the random-weight model can run past max_tokens.
    first = client.messages.create(
        model=MODEL,
        max_tokens=80,
        messages=messages,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        extra_body=GREEDY,
    )
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert uses and all(u.name in ("get_weather", "get_time") and isinstance(u.input, dict) for u in uses)
    for use in uses:
        if use.name == "get_weather":
            assert use.input["city"] in ("Paris", "Rome")  # type: ignore[index]
    messages.append({"role": "assistant", "content": first.content})
    results = [
        {"type": "tool_result", "tool_use_id": u.id, "content": [{"type": "text", "text": "sunny, 21 C"}]}
        for u in uses
    ]
    messages.append({"role": "user", "content": results})
    second = client.messages.create(model=MODEL, max_tokens=6, messages=messages, tools=[WEATHER, CLOCK])
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0) > first.usage.input_tokens


def test_named_tool_streams_input_json(client: anthropic.Anthropic) -> None:
    deltas: list[str] = []
    with client.messages.stream(
        model=MODEL,
        max_tokens=60,
        messages=user(),
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                deltas.append(event.delta.partial_json)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    uses = [b for b in final.content if b.type == "tool_use"]
    assert [u.name for u in uses] == ["get_weather"]
    assert json.loads("".join(deltas)) == uses[0].input and uses[0].input["city"] in ("Paris", "Rome")  # type: ignore[index]


def test_thinking_on_and_off(client: anthropic.Anthropic) -> None:
    # A forced tool call makes the tiny model open <think> (the grammar allows it), then call the tool.
    args: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 80,
        "messages": user("Weather in Rome?"),
        "tools": [WEATHER],
        "tool_choice": {"type": "any"},
    }
    on = client.messages.create(**args, thinking={"type": "enabled", "budget_tokens": 3})
    kinds = [b.type for b in on.content]
    assert kinds[0] == "thinking" and "tool_use" in kinds
    assert on.content[0].thinking  # type: ignore[union-attr]
    thinking_tokens = on.usage.output_tokens_details.thinking_tokens  # type: ignore[union-attr]
    assert 1 <= thinking_tokens <= 3
    with client.messages.stream(**args, thinking={"type": "enabled", "budget_tokens": 3}) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].type == "thinking" and streamed.content[0].thinking  # type: ignore[union-attr]
    for off in (
        client.messages.create(**args),  # Anthropic's default: no thinking
        client.messages.create(**args, thinking={"type": "disabled"}),
    ):
        assert "thinking" not in [b.type for b in off.content]
        assert off.usage.output_tokens_details.thinking_tokens == 0  # type: ignore[union-attr]


def test_output_format_and_effort(client: anthropic.Anthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    fmt = {"format": {"type": "json_schema", "schema": schema}}
    answer = client.messages.create(model=MODEL, max_tokens=40, messages=user(), output_config=fmt)
    assert answer.stop_reason == "end_turn" and [b.type for b in answer.content] == ["text"]
    assert isinstance(json.loads(answer.content[0].text)["ok"], bool)  # type: ignore[union-attr]
    # effort turns thinking on (Anthropic's thinking depth → the thinking budget) unless thinking is disabled.
    args: dict[str, Any] = {"model": MODEL, "max_tokens": 12, "messages": user(), "tools": [WEATHER]}
    args["tool_choice"] = {"type": "any"}
    thought = client.messages.create(**args, output_config={"effort": "low"})
    assert thought.content[0].type == "thinking"
    plain = client.messages.create(**args, output_config={"effort": "low"}, thinking={"type": "disabled"})
    assert "thinking" not in [b.type for b in plain.content]


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    args: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 16,
        "messages": user(),
        "extra_body": GREEDY,
    }
    free = client.messages.create(**args)
    text = free.content[0].text  # type: ignore[union-attr]
    # Three characters of what greedy decoding writes, at their first occurrence: the same run stops there.
    at = next(
        i
        for i in range(1, len(text) - 2)
        if text[i : i + 3].split() == [text[i : i + 3]] and text.find(text[i : i + 3]) == i
    )
    stop = text[at : at + 3]
    stopped = client.messages.create(**args, stop_sequences=[stop, "never-in-this-output-zq"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    got = stopped.content[0].text if stopped.content else ""  # type: ignore[union-attr]
    assert got == text[:at]
    with client.messages.stream(**args, stop_sequences=[stop]) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "stop_sequence" and streamed.stop_sequence == stop
    assert (streamed.content[0].text if streamed.content else "") == got  # type: ignore[union-attr]


def test_raw_stream_event_names(server: LiveServer) -> None:
    body = {"model": MODEL, "max_tokens": 3, "messages": user(), "stream": True}
    with httpx.stream(
        "POST", server.base_url + "/v1/messages", json=body, headers={"x-api-key": API_KEY}, timeout=60
    ) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    datas = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in datas] == names  # each event's name is its data's type
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    assert names[2] == "content_block_start" and "content_block_stop" in names
    final = datas[-2]
    assert final["delta"]["stop_reason"] == "max_tokens" and final["usage"]["output_tokens"] == 3


def test_keys(server: LiveServer) -> None:
    bearer = anthropic.Anthropic(base_url=server.base_url, auth_token=API_KEY, max_retries=0)
    assert bearer.messages.count_tokens(model=MODEL, messages=user()).input_tokens > 0
    wrong = anthropic.Anthropic(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        wrong.messages.create(model=MODEL, max_tokens=2, messages=user())
    assert err.value.body["type"] == "error"  # type: ignore[index]
    assert err.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert "x-api-key" in err.value.body["error"]["message"]  # type: ignore[index]


BAD: list[tuple[str, dict[str, Any]]] = [
    ("no max_tokens", {"messages": user()}),
    ("max_tokens zero", {"max_tokens": 0, "messages": user()}),
    ("max_tokens a string", {"max_tokens": "4", "messages": user()}),
    ("no messages", {"max_tokens": 4, "messages": []}),
    ("system role in messages", {"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}),
    ("content a number", {"max_tokens": 4, "messages": [{"role": "user", "content": 3}]}),
    ("block without type", {"max_tokens": 4, "messages": [{"role": "user", "content": [{"text": "x"}]}]}),
    ("image block", {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
    ("unknown block", {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
    (
        "text not a string",
        {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
    ),
    (
        "tool_result without id",
        {"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
    ),
    (
        "tool_use input a list",
        {
            "max_tokens": 4,
            "messages": [
                *user(),
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": []}],
                },
            ],
        },
    ),
    (
        "server tool",
        {"max_tokens": 4, "messages": user(), "tools": [{"type": "web_search_20250305", "name": "w"}]},
    ),
    ("tool without schema", {"max_tokens": 4, "messages": user(), "tools": [{"name": "f"}]}),
    (
        "tool_choice tool without name",
        {"max_tokens": 4, "messages": user(), "tools": [WEATHER], "tool_choice": {"type": "tool"}},
    ),
    (
        "tool_choice unknown tool",
        {
            "max_tokens": 4,
            "messages": user(),
            "tools": [WEATHER],
            "tool_choice": {"type": "tool", "name": "nope"},
        },
    ),
    (
        "thinking budget over max_tokens",
        {"max_tokens": 4, "messages": user(), "thinking": {"type": "enabled", "budget_tokens": 8}},
    ),
    ("thinking unknown type", {"max_tokens": 4, "messages": user(), "thinking": {"type": "sometimes"}}),
    (
        "budget with thinking disabled",
        {"max_tokens": 9, "messages": user(), "thinking": {"type": "disabled", "budget_tokens": 2}},
    ),
    (
        "stop_sequences too many",
        {"max_tokens": 4, "messages": user(), "stop_sequences": [str(i) for i in range(99)]},
    ),
    ("stop_sequences empty string", {"max_tokens": 4, "messages": user(), "stop_sequences": [""]}),
    ("max_tokens over the context", {"max_tokens": 10**6, "messages": user()}),
    (
        "output format not a schema",
        {"max_tokens": 4, "messages": user(), "output_config": {"format": {"type": "text"}}},
    ),
]


@pytest.mark.parametrize(("name", "body"), BAD, ids=[name for name, _ in BAD])
def test_bad_input_is_a_400_in_anthropics_shape(server: LiveServer, name: str, body: dict[str, Any]) -> None:
    reply = httpx.post(
        server.base_url + "/v1/messages",
        json={"model": MODEL, **body},
        headers={"x-api-key": API_KEY},
        timeout=60,
    )
    assert reply.status_code == 400, (name, reply.text)
    error = reply.json()
    assert set(error) == {"type", "error"} and error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]


def test_other_errors_in_anthropics_shape(client: anthropic.Anthropic, server: LiveServer) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-nope", max_tokens=2, messages=user())
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.count_tokens(model=MODEL, messages=[])
    assert bad.value.body["type"] == "error"  # type: ignore[index]
    headers = {"x-api-key": API_KEY, "content-type": "text/plain"}
    reply = httpx.post(server.base_url + "/v1/messages", content=b"{}", headers=headers, timeout=60)
    assert reply.status_code == 415 and reply.json()["type"] == "error"
    # The OpenAI routes keep their own shape.
    reply = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={},
        headers=BEARER,
    )
    assert reply.status_code == 400 and "type" in reply.json()["error"] and "param" in reply.json()["error"]
    # And the server still answers.
    assert client.messages.create(model=MODEL, max_tokens=2, messages=user()).usage.output_tokens == 2


def test_caps_rate_limits_and_metrics_cover_the_messages_routes(demo_checkpoint: Callable[..., Path]) -> None:
    # The door (key, body cap, rate limit) is the real middleware; a scripted engine keeps this cheap.
    engine = FakeEngine(QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny")))
    now = [1000.0]
    config = ServeConfig(api_keys=(API_KEY,), rate_limit_rpm=2, max_body_bytes=4096)  # type: ignore[arg-type]
    with in_process(fake_app(engine, config, clock=lambda: now[0])) as http:
        key = {"x-api-key": API_KEY}
        ok = http.post(
            "/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": user()}, headers=key
        )
        assert ok.status_code == 200 and ok.json()["content"] == [{"type": "text", "text": "hello world"}]
        assert ok.json()["stop_reason"] == "end_turn"
        huge = {"model": MODEL, "max_tokens": 4, "messages": user("x" * 5000)}
        too_big = http.post("/v1/messages", json=huge, headers=key)
        assert too_big.status_code == 413
        assert too_big.json()["error"]["type"] == "request_too_large"
        limited = http.post(
            "/v1/messages/count_tokens", json={"model": MODEL, "messages": user()}, headers=key
        )
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert limited.json() == {"type": "error", "error": limited.json()["error"]}
        assert limited.json()["error"]["type"] == "rate_limit_error"
        # x-api-key is Anthropic's header: the OpenAI routes keep asking for the bearer token.
        assert http.get("/v1/models", headers=key).status_code == 401
        metrics = http.get("/metrics", headers=BEARER).text
    assert 'route="/v1/messages",status="200"' in metrics
    assert 'route="/v1/messages",status="413"' in metrics
    assert 'route="/v1/messages/count_tokens",status="429"' in metrics
