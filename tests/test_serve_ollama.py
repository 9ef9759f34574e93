"""The official `ollama` client against a real server (uvicorn on 127.0.0.1, llama.cpp, the tiny demo model)
on /api/*: tags, show, version, chat and generate (NDJSON streams that add up to the whole answer), think
on/off with message.thinking, format (JSON schema), options, tool-call history in and (scripted) tool calls
out, embeddings refused (a chat model), and bad input answered as {"error": ...} while the server keeps
serving. Embeddings on an embedding model: tests/test_serve_embeddings.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import (
    API_KEY,
    MODEL,
    WEATHER,
    FakeEngine,
    LiveServer,
    fake_app,
    in_process,
    keyed_server,
)

BEARER = {"Authorization": f"Bearer {API_KEY}"}
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


server = keyed_server(8192)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> ollama.Client:
    return ollama.Client(host=server.base_url, headers=BEARER, timeout=120)


def user(text: str = "Hello there") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_tags_show_version(client: ollama.Client, server: LiveServer) -> None:
    assert [m.model for m in client.list().models] == [MODEL]
    shown = client.show(MODEL)
    assert shown.capabilities == ["completion", "tools", "thinking"]  # no vision projector, no embedding
    assert shown.modelinfo is not None and server.engine.n_ctx in shown.modelinfo.values()
    version = httpx.get(server.base_url + "/api/version", headers=BEARER).json()["version"]
    assert isinstance(version, str) and version


def test_chat_stream_adds_up_to_the_whole_answer(client: ollama.Client) -> None:
    args: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "Be brief."}, *user("Count to five")],
        "think": False,
        "options": {"num_predict": 8, "temperature": 0},
    }
    whole = client.chat(**args)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 8
    assert whole.prompt_eval_count and whole.message.content and whole.message.thinking is None
    chunks = list(client.chat(**args, stream=True))
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
    assert "".join(c.message.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].eval_count == 8 and chunks[-1].done_reason == "length"


def test_generate_with_system_and_stream(client: ollama.Client) -> None:
    args: dict[str, Any] = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "system": "Tell stories.",
        "think": False,
        "options": {"num_predict": 6, "temperature": 0},
    }
    whole = client.generate(**args)
    assert whole.done and whole.eval_count == 6 and whole.response
    streamed = list(client.generate(**args, stream=True))
    assert "".join(c.response or "" for c in streamed) == whole.response
    no_system = client.generate(**{**args, "system": None})
    assert (whole.prompt_eval_count or 0) > (no_system.prompt_eval_count or 0)


def test_think_and_format(client: ollama.Client) -> None:
    # The schema's grammar lets the tiny model open <think>; the budget keeps the thinking short.
    args: dict[str, Any] = {"model": MODEL, "messages": user("Is it ok?"), "format": SCHEMA}
    on = client.chat(**args, think=True, options={"num_predict": 80, "thinking_budget": 4, "seed": 7})
    assert on.message.thinking and json.loads(on.message.content or "")["ok"] in (True, False)
    streamed = list(
        client.chat(
            **args, think=True, stream=True, options={"num_predict": 80, "thinking_budget": 4, "seed": 7}
        )
    )
    assert "".join(c.message.thinking or "" for c in streamed) == on.message.thinking
    off = client.chat(**args, think=False, options={"num_predict": 40})
    assert off.message.thinking is None and isinstance(json.loads(off.message.content or ""), dict)


def test_tool_history_reaches_the_prompt(client: ollama.Client) -> None:
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    history = [
        *user("Weather in Paris?"),
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_name": "get_weather", "content": "sunny, 21 C"},
    ]
    options = {"num_predict": 2}
    short = client.chat(
        model=MODEL, messages=user("Weather in Paris?"), tools=[WEATHER], think=False, options=options
    )
    long = client.chat(model=MODEL, messages=history, tools=[WEATHER], think=False, options=options)
    assert (long.prompt_eval_count or 0) > (short.prompt_eval_count or 0)


def test_tool_calls_come_back_whole(demo_checkpoint: Callable[..., Path]) -> None:
    # A tool call in auto mode is what the tiny model cannot be made to write: a scripted engine writes it.
    output = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    engine = FakeEngine(
        QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny")), script=lambda r: output, chunk=4
    )
    body = {"model": MODEL, "messages": user(), "tools": [WEATHER], "think": False}
    with in_process(fake_app(engine)) as http:
        whole = ollama.ChatResponse.model_validate(
            http.post("/api/chat", json={**body, "stream": False}).json()
        )
        reply = http.post("/api/chat", json=body)
        assert reply.headers["content-type"].startswith("application/x-ndjson")
        lines = [ollama.ChatResponse.model_validate_json(line) for line in reply.text.splitlines()]
    calls = whole.message.tool_calls or []
    assert [(c.function.name, dict(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Rome"})
    ]
    streamed = [c for line in lines for c in line.message.tool_calls or []]
    assert streamed == calls and lines[-1].done and whole.done_reason == "stop"


def test_a_chat_model_refuses_embeddings_in_ollamas_shape(client: ollama.Client) -> None:
    calls: list[Callable[[], object]] = [
        lambda: client.embed(model=MODEL, input="hi"),
        lambda: client.embed(model=MODEL, input=""),
        lambda: client.embeddings(model=MODEL, prompt="hi"),
    ]
    for call in calls:
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 400
        assert (
            "chat model" in err.value.error
            and "qwenkit serve --model Qwen/Qwen3-Embedding" in err.value.error
        )


BAD: list[tuple[str, str, dict[str, Any]]] = [
    ("no messages", "/api/chat", {"messages": []}),
    ("messages not a list", "/api/chat", {"messages": "hi"}),
    ("message not an object", "/api/chat", {"messages": ["hi"]}),
    ("unknown role", "/api/chat", {"messages": [{"role": "robot", "content": "x"}]}),
    ("content a number", "/api/chat", {"messages": [{"role": "user", "content": 5}]}),
    ("images", "/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}),
    ("tool message first", "/api/chat", {"messages": [{"role": "tool", "content": "x"}]}),
    (
        "tool call arguments a string",
        "/api/chat",
        {
            "messages": [
                *user(),
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
            ]
        },
    ),
    ("think not bool or level", "/api/chat", {"messages": user(), "think": "max"}),
    ("format a number", "/api/chat", {"messages": user(), "format": 3}),
    ("format text", "/api/chat", {"messages": user(), "format": "yaml"}),
    ("options not an object", "/api/chat", {"messages": user(), "options": [1]}),
    ("num_predict zero", "/api/chat", {"messages": user(), "options": {"num_predict": 0}}),
    ("num_ctx too large", "/api/chat", {"messages": user(), "options": {"num_ctx": 10**7}}),
    ("temperature a string", "/api/chat", {"messages": user(), "options": {"temperature": "hot"}}),
    ("tools not objects", "/api/chat", {"messages": user(), "tools": ["get_weather"]}),
    ("stream a string", "/api/chat", {"messages": user(), "stream": "yes"}),
    ("raw generate", "/api/generate", {"prompt": "x", "raw": True}),
    ("suffix", "/api/generate", {"prompt": "x", "suffix": "y"}),
    ("prompt a list", "/api/generate", {"prompt": ["x"]}),
]


@pytest.mark.parametrize(("name", "path", "body"), BAD, ids=[name for name, _, _ in BAD])
def test_bad_input_is_a_400_in_ollamas_shape(
    server: LiveServer, name: str, path: str, body: dict[str, Any]
) -> None:
    reply = httpx.post(server.base_url + path, json={"model": MODEL, "stream": False, **body}, headers=BEARER)
    assert reply.status_code == 400, (name, reply.text)
    error = reply.json()
    assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"]


def test_refusals_and_missing_models(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as pull:
        client.pull("qwen3:8b")
    assert pull.value.status_code == 400 and "qwenkit serve --model" in pull.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="llama3:8b", messages=user())
    assert missing.value.status_code == 404 and MODEL in missing.value.error
    with pytest.raises(ollama.ResponseError) as no_key:
        ollama.Client(host=client._client.base_url.__str__()).list()
    assert no_key.value.status_code == 401
    done = client.chat(model=MODEL, messages=user(), think=False, options={"num_predict": 2})
    assert done.eval_count == 2  # still serving
