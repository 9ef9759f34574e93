"""The official `openai` client's Responses API against a real server (uvicorn on 127.0.0.1, llama.cpp, the
tiny demo model) on /v1/responses: create and stream (the same output), instructions, max_output_tokens
cut-offs, a forced function call and its function_call_output round trip, text.format json_schema,
reasoning on and off, previous_response_id with the store on (per key, LRU) and refused with it off, and
bad input answered in OpenAI's error shape while the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

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
from serve_fixtures import WEATHER as CHAT_WEATHER

OTHER_KEY = "sk-other-0123456789abcdef"
# The shared chat-completions tool in the Responses API's flat shape.
WEATHER = {"type": "function", **CHAT_WEATHER["function"]}
NO_THINKING = {"effort": "none"}
STORE = 3


server = keyed_server(8192, OTHER_KEY, responses_store=STORE)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def dump(response: Any) -> list[dict[str, Any]]:
    return [item.model_dump(exclude_none=True) for item in response.output]


def test_create_and_stream_give_the_same_response(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": MODEL,
        "input": "Count to five",
        "instructions": "Answer briefly.",
        "max_output_tokens": 10,
        "reasoning": NO_THINKING,
        "temperature": 0,
    }
    whole = client.responses.create(**args)
    assert whole.object == "response" and whole.model == MODEL and whole.id.startswith("resp_")
    assert whole.status == "incomplete" and whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in whole.output] == ["message"] and whole.output_text
    assert whole.instructions == "Answer briefly."
    assert whole.usage is not None and whole.usage.output_tokens == 10
    assert whole.usage.output_tokens_details.reasoning_tokens == 0
    events = []
    with client.responses.stream(**args) as stream:
        for event in stream:
            events.append(event)
        streamed = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for name in ("output_item.added", "content_part.added", "output_text.done", "output_item.done"):
        assert "response." + name in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == streamed.output_text
    assert [i["content"] for i in dump(streamed)] == [i["content"] for i in dump(whole)]
    assert streamed.status == "incomplete" and streamed.usage.output_tokens == 10  # type: ignore[union-attr]


def test_the_wire_validates_against_the_sdks_types(server: LiveServer) -> None:
    # Strict validation of what is sent (the SDK itself builds stream events without checking them).
    body = {"model": MODEL, "input": "Weather?", "tools": [WEATHER], "tool_choice": "required"}
    # Cut off while reasoning; the summary asked for is the reasoning itself (Qwen writes no other).
    body |= {"max_output_tokens": 12, "reasoning": {"effort": "low", "summary": "auto"}}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = server.base_url + "/v1/responses"
    whole = httpx.post(url, json=body, headers=headers, timeout=60)
    assert whole.status_code == 200, whole.text
    parsed = Response.model_validate(whole.json())
    assert [item.type for item in parsed.output] == ["reasoning"] and parsed.status == "incomplete"
    reasoning = parsed.output[0]
    assert reasoning.type == "reasoning" and reasoning.content and reasoning.content[0].text
    assert [part.text for part in reasoning.summary] == [reasoning.content[0].text]
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    kinds: list[str] = []
    for effort in ("low", "none"):  # reasoning (cut off), then a whole function call
        streamed = {**body, "stream": True, "reasoning": {"effort": effort, "summary": "auto"}}
        streamed["max_output_tokens"] = 12 if effort == "low" else 60
        with httpx.stream("POST", url, json=streamed, headers=headers, timeout=60) as reply:
            lines = [line for line in reply.iter_lines() if line]
        for name, data in zip(lines[::2], lines[1::2], strict=True):
            event = adapter.validate_python(json.loads(data.removeprefix("data: ")))
            assert name == f"event: {event.type}"
            kinds.append(event.type)
        assert kinds[-1] == "response.completed"
    names = ["reasoning_text.delta", "reasoning_text.done", "function_call_arguments.done"]
    names += ["reasoning_summary_part.added", "reasoning_summary_text.delta", "reasoning_summary_part.done"]
    for name in names:
        assert "response." + name in kinds


def test_instructions_and_items_reach_the_prompt(client: openai.OpenAI) -> None:
    short = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1, reasoning=NO_THINKING)
    longer = client.responses.create(
        model=MODEL,
        instructions="You are a terse assistant.",
        input=[
            {"role": "developer", "content": "Never apologise."},
            {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
            {"role": "user", "content": "Again?"},
        ],
        max_output_tokens=1,
        reasoning=NO_THINKING,
    )
    assert longer.usage.input_tokens > short.usage.input_tokens + 10  # type: ignore[union-attr]


def test_forced_function_call_and_output_round_trip(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        reasoning=NO_THINKING,
        max_output_tokens=60,
    )
    assert first.status == "completed"
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments)["city"] in ("Paris", "Rome")
    history: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    history += [item.model_dump(exclude_none=True) for item in first.output]
    history.append({"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21 C"})
    second = client.responses.create(
        model=MODEL,
        input=history,
        tools=[WEATHER],
        reasoning=NO_THINKING,
        max_output_tokens=4,  # type: ignore[list-item]
    )
    assert second.status in ("completed", "incomplete")
    assert second.usage.input_tokens > first.usage.input_tokens  # type: ignore[union-attr]
    # Streamed: the arguments arrive as deltas that add up to the final item's.
    with client.responses.stream(
        model=MODEL,
        input="Weather in Rome?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        reasoning=NO_THINKING,
        max_output_tokens=60,
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    streamed_calls = [item for item in final.output if item.type == "function_call"]
    assert len(streamed_calls) == 1 and "".join(deltas) == streamed_calls[0].arguments


def test_text_format_json_schema_gives_valid_json(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    answer = client.responses.create(
        model=MODEL,
        input="Is it fine?",
        text={"format": {"type": "json_schema", "name": "verdict", "schema": schema, "strict": True}},
        reasoning=NO_THINKING,
        max_output_tokens=40,
    )
    assert answer.status == "completed"
    assert isinstance(json.loads(answer.output_text)["ok"], bool)
    assert answer.text is not None and answer.text.format.type == "json_schema"  # type: ignore[union-attr]


def test_reasoning_on_and_off(client: openai.OpenAI) -> None:
    # A forced call makes the tiny model open <think> (the grammar allows it) before the call.
    args: dict[str, Any] = {
        "model": MODEL,
        "input": "Weather in Rome?",
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_output_tokens": 80,
    }
    on = client.responses.create(**args, reasoning={"effort": "low"})
    assert on.output[0].type == "reasoning" and on.output[0].content and on.output[0].content[0].text
    assert on.output[0].summary == []  # no summary unless reasoning.summary asks for one
    assert on.usage.output_tokens_details.reasoning_tokens >= 1  # type: ignore[union-attr]
    with client.responses.stream(**args, reasoning={"effort": "low"}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.reasoning_text.delta"]
        streamed = stream.get_final_response()
    assert streamed.output[0].type == "reasoning"
    assert "".join(deltas) == streamed.output[0].content[0].text  # type: ignore[index]
    off = client.responses.create(**args, reasoning=NO_THINKING)
    assert "reasoning" not in [item.type for item in off.output]
    assert off.usage.output_tokens_details.reasoning_tokens == 0  # type: ignore[union-attr]


def test_previous_response_id_continues_per_key(client: openai.OpenAI, server: LiveServer) -> None:
    first = client.responses.create(
        model=MODEL, input="My name is Ada.", max_output_tokens=3, reasoning=NO_THINKING
    )
    assert first.store is True
    alone = client.responses.create(
        model=MODEL, input="Who am I?", max_output_tokens=1, reasoning=NO_THINKING
    )
    follow = client.responses.create(
        model=MODEL,
        input="Who am I?",
        previous_response_id=first.id,
        max_output_tokens=1,
        reasoning=NO_THINKING,
    )
    assert follow.previous_response_id == first.id
    # The stored turn (input and output) is in front of the new input.
    assert follow.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens  # type: ignore[union-attr]
    other = openai.OpenAI(base_url=server.base_url + "/v1", api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        other.responses.create(model=MODEL, input="Who am I?", previous_response_id=first.id)
    assert err.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_unknown")
    # store false keeps nothing; the store keeps only the last STORE responses.
    unstored = client.responses.create(
        model=MODEL, input="x", store=False, max_output_tokens=1, reasoning=NO_THINKING
    )
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id=unstored.id)
    for _ in range(STORE):
        client.responses.create(model=MODEL, input="x", max_output_tokens=1, reasoning=NO_THINKING)
    with pytest.raises(openai.NotFoundError) as evicted:
        client.responses.create(model=MODEL, input="x", previous_response_id=first.id)
    assert "--responses-store" in evicted.value.message


def test_previous_response_id_is_refused_without_the_store(demo_checkpoint: Callable[..., Path]) -> None:
    # Refused while planning, before any engine runs: the fake engine is never asked.
    engine = FakeEngine(QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny")))
    with in_process(fake_app(engine)) as http:
        body = {"model": MODEL, "input": "x", "previous_response_id": "resp_1"}
        reply = http.post("/v1/responses", json=body)
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["param"] == "previous_response_id" and "--responses-store" in error["message"]
        assert http.post("/v1/responses", json={"model": MODEL, "input": "x"}).status_code == 200
    assert len(engine.requests) == 1


def test_retrieve_and_delete_per_key(client: openai.OpenAI, server: LiveServer) -> None:
    made = client.responses.create(model=MODEL, input="Say hi", max_output_tokens=3, reasoning=NO_THINKING)
    got = client.responses.retrieve(made.id)
    assert got.model_dump() == made.model_dump()  # the same object, usage and output included
    other = openai.OpenAI(base_url=server.base_url + "/v1", api_key=OTHER_KEY, max_retries=0, timeout=120)
    for call in (other.responses.retrieve, other.responses.delete):  # another key's id is unknown to it
        with pytest.raises(openai.NotFoundError):
            call(made.id)
    for method in ("GET", "DELETE"):  # the key is required, as on every route but /health
        assert httpx.request(method, f"{server.base_url}/v1/responses/{made.id}").status_code == 401
    assert client.responses.delete(made.id) is None
    for call in (client.responses.retrieve, client.responses.delete):  # deleted: gone for good
        with pytest.raises(openai.NotFoundError) as gone:
            call(made.id)
        assert made.id in gone.value.message
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="x", previous_response_id=made.id)
    unstored = client.responses.create(
        model=MODEL, input="x", store=False, max_output_tokens=1, reasoning=NO_THINKING
    )
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_retrieve_without_the_store_names_the_option(demo_checkpoint: Callable[..., Path]) -> None:
    engine = FakeEngine(QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny")))
    with in_process(fake_app(engine)) as http:
        made = http.post("/v1/responses", json={"model": MODEL, "input": "x"}).json()
        assert made["store"] is False
        for method in ("GET", "DELETE"):
            reply = http.request(method, f"/v1/responses/{made['id']}")
            assert reply.status_code == 404
            assert "--responses-store" in reply.json()["error"]["message"]


BAD: list[tuple[str, dict[str, Any], str | None]] = [
    ("no input", {}, "input"),
    ("input number", {"input": 3}, "input"),
    ("empty input list", {"input": []}, "input"),
    ("unknown item type", {"input": [{"type": "web_search_call"}]}, "input"),
    ("bad role", {"input": [{"role": "tool", "content": "x"}]}, "input"),
    (
        "image part",
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        "input",
    ),
    (
        "wrong part for user",
        {"input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]},
        "input",
    ),
    ("call without call_id", {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input"),
    (
        "call args not string",
        {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]},
        "input",
    ),
    ("output without call_id", {"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
    ("item reference", {"input": [{"type": "item_reference", "id": "x"}]}, "input"),
    ("web search tool", {"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ("tool unknown field", {"input": "x", "tools": [{**WEATHER, "extra": 1}]}, "tools"),
    ("tool_choice word", {"input": "x", "tool_choice": "sometimes"}, "tool_choice"),
    (
        "tool_choice shape",
        {"input": "x", "tool_choice": {"type": "allowed_tools", "tools": []}},
        "tool_choice",
    ),
    (
        "named tool not offered",
        {"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
        None,
    ),
    (
        "schema missing",
        {"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
        "text.format",
    ),
    ("format type", {"input": "x", "text": {"format": {"type": "yaml"}}}, None),
    ("effort word", {"input": "x", "reasoning": {"effort": "extreme"}}, None),
    ("max_output_tokens zero", {"input": "x", "max_output_tokens": 0}, None),
    ("max_output_tokens string", {"input": "x", "max_output_tokens": "5"}, None),
    ("temperature string", {"input": "x", "temperature": "hot"}, None),
    ("instructions list", {"input": "x", "instructions": ["a"]}, None),
    ("metadata non-string", {"input": "x", "metadata": {"a": 1}}, None),
]


@pytest.mark.parametrize(("name", "body", "param"), BAD, ids=[name for name, _, _ in BAD])
def test_bad_input_is_a_400_in_openais_shape(
    server: LiveServer, name: str, body: dict[str, Any], param: str | None
) -> None:
    reply = httpx.post(
        server.base_url + "/v1/responses",
        json={"model": MODEL, **body},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert reply.status_code == 400, (name, reply.text)
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param, (name, error)


def test_auth_model_and_the_server_keeps_serving(client: openai.OpenAI, server: LiveServer) -> None:
    wrong = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.responses.create(model=MODEL, input="x")
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="gpt-nope", input="x")
    assert missing.value.body["param"] == "model"  # type: ignore[index]
    ok = client.responses.create(model=MODEL, input="Hi", max_output_tokens=2, reasoning=NO_THINKING)
    assert ok.status in ("completed", "incomplete") and ok.output


def test_caps_rate_limits_and_metrics_cover_the_route(demo_checkpoint: Callable[..., Path]) -> None:
    # The door (key, body cap, rate limit) is the real middleware; a scripted engine keeps this cheap.
    engine = FakeEngine(QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny")))
    now = [1000.0]
    config = ServeConfig(api_keys=(API_KEY,), rate_limit_rpm=2, max_body_bytes=4096)  # type: ignore[arg-type]
    with in_process(fake_app(engine, config, clock=lambda: now[0])) as http:
        bearer = {"Authorization": f"Bearer {API_KEY}"}
        assert http.post("/v1/responses", json={"model": MODEL, "input": "x"}).status_code == 401
        body = {"model": MODEL, "input": "x", "frobnicate": 1}  # unknown fields: served, and named
        ok = http.post("/v1/responses", json=body, headers=bearer)
        assert ok.status_code == 200 and ok.json()["output"][0]["content"][0]["text"] == "hello world"
        assert "frobnicate" in ok.headers["x-qwenkit-warning"]
        huge = http.post("/v1/responses", json={"model": MODEL, "input": "x" * 5000}, headers=bearer)
        assert huge.status_code == 413
        limited = http.post("/v1/responses", json={"model": MODEL, "input": "x"}, headers=bearer)
        assert limited.status_code == 429 and "error" in limited.json()
        metrics = http.get("/metrics", headers=bearer).text
    assert 'route="/v1/responses",status="200"' in metrics
    assert 'route="/v1/responses",status="413"' in metrics
