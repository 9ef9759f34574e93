"""The fields real OpenAI/vLLM clients send, on the real tiny demo engine: ignore_eos, min_tokens,
logit_bias, stop_token_ids, include_stop_str_in_output, skip_special_tokens, echo, assistant prefill,
reasoning_effort, verbosity, modalities, response_format on /v1/completions, unknown fields (ignored, named
in an ASCII-safe warning header), the body depth cap, parallel_tool_calls false in auto mode, client text
in headers through uvicorn/h11, cleanup when a stream cannot start, and planning off the event loop."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import qwenkit.serve.app as app_module
import qwenkit.serve.handlers as handlers_module
from qwenkit.engines.sampling import MAX_LOGIT_BIAS
from qwenkit.serve.app import serve_context
from qwenkit.serve.protocol import MAX_JSON_DEPTH
from qwenkit.tokenizer.specials import IM_END, IM_START
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import (
    MODEL,
    FakeEngine,
    LiveServer,
    RecordingEngine,
    demo_app,
    demo_engine,
    fake_app,
    in_process,
    live_server,
)

NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
WARNING = "x-qwenkit-warning"


@dataclass
class Served:
    client: TestClient
    engine: RecordingEngine
    tokenizer: QwenTokenizer


@pytest.fixture(scope="module")
def served(demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path]) -> Iterator[Served]:
    tokenizer = QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny"))
    engine = RecordingEngine(demo_engine(demo_gguf("qwen3", "tiny", "f32")))
    with in_process(demo_app(engine, tokenizer)) as client:
        yield Served(client, engine, tokenizer)


@pytest.fixture(scope="module")
def live(demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path]) -> Iterator[LiveServer]:
    with live_server(demo_gguf("qwen3", "tiny", "f32"), demo_checkpoint("qwen3", "tiny")) as server:
        yield server


def complete(s: Served, **body: Any) -> httpx.Response:
    return s.client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", **body})


def chat(s: Served, messages: list[dict[str, Any]] | None = None, **body: Any) -> httpx.Response:
    messages = messages or [{"role": "user", "content": "Hello"}]
    return s.client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, **body})


def events(text: str) -> list[dict[str, Any]]:
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", text[-300:]
    return [json.loads(line) for line in lines[:-1]]


def printable_ascii(value: str) -> bool:
    return all(0x20 <= ord(c) < 0x7F for c in value) and value == value.strip()


def token(s: Served, text: str) -> int:
    ids = s.tokenizer.encode(text)
    assert len(ids) == 1, ids
    return ids[0]


# ---- sampling extras (completions: the text comes back as generated) -------------------------------------


def test_ignore_eos_and_logit_bias(served: Served) -> None:
    im_end = str(served.tokenizer.special_id(IM_END))
    forced_end = {"logit_bias": {im_end: 100}, "temperature": 0, "max_tokens": 6}
    stopped = complete(served, **forced_end).json()
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] <= 1
    ignored = complete(served, **forced_end, ignore_eos=True)
    assert ignored.status_code == 200, ignored.text
    body = ignored.json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 6
    sent = served.engine.requests[-1]
    assert sent.ignore_eos and int(im_end) not in sent.stop_token_ids


def test_min_tokens_holds_the_end_back(served: Served) -> None:
    im_end = str(served.tokenizer.special_id(IM_END))
    body = complete(served, logit_bias={im_end: 100}, temperature=0, max_tokens=12, min_tokens=4).json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] > 4


def test_stop_token_ids_and_include_stop_str(served: Served) -> None:
    hello = token(served, "hello")
    forced = {"logit_bias": {str(hello): 100}, "temperature": 0, "max_tokens": 4}
    free = complete(served, **forced).json()["choices"][0]
    assert free["finish_reason"] == "length" and free["text"] == "hello" * 4
    by_id = complete(served, **forced, stop_token_ids=[hello]).json()["choices"][0]
    assert by_id["finish_reason"] == "stop" and by_id["text"] == ""
    cut = complete(served, **forced, stop=["hello"]).json()["choices"][0]
    kept = complete(served, **forced, stop=["hello"], include_stop_str_in_output=True).json()["choices"][0]
    assert cut["text"] == "" and kept["text"] == "hello" and kept["finish_reason"] == "stop"


def test_skip_special_tokens(served: Served) -> None:
    im_start = str(served.tokenizer.special_id(IM_START))
    forced = {"logit_bias": {im_start: 100}, "temperature": 0, "max_tokens": 3}
    shown = complete(served, **forced, skip_special_tokens=False).json()["choices"][0]["text"]
    hidden = complete(served, **forced).json()["choices"][0]["text"]
    assert shown == IM_START * 3 and hidden == ""


def test_response_format_on_completions(served: Served) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "yn", "schema": {"enum": ["yes", "no"]}}}
    for seed in (1, 2, 3):
        choice = complete(served, response_format=fmt, max_tokens=20, seed=seed).json()["choices"][0]
        assert json.loads(choice["text"]) in ("yes", "no") and choice["finish_reason"] == "stop"
    assert served.engine.requests[-1].grammar is not None
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    refused = complete(served, response_format=bad)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "response_format"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ignore_eos", "yes"),
        ("min_tokens", -1),
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {"99999999": 1}),
        ("logit_bias", {"1": 500}),
        ("logit_bias", {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", [10**9]),
        ("skip_special_tokens", 1),
        ("echo", "true"),
    ],
)
def test_wrong_values_are_refused_naming_the_field(served: Served, field: str, value: Any) -> None:
    response = complete(served, **{field: value}, max_tokens=4)
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["param"] or "").startswith(field)


def test_min_tokens_above_max_tokens_is_refused(served: Served) -> None:
    for response in (complete(served, min_tokens=9, max_tokens=4), chat(served, min_tokens=9, max_tokens=4)):
        assert response.status_code == 400 and response.json()["error"]["param"] == "min_tokens"


# ---- chat fields ------------------------------------------------------------------------------------------


PREFILL = [
    {"role": "user", "content": "Say something"},
    {"role": "assistant", "content": "Sure, the answer is"},
]


def test_continue_final_message_and_echo(served: Served) -> None:
    for how in ({"continue_final_message": True}, {"add_generation_prompt": False}):
        response = chat(served, PREFILL, **how, echo=True, max_tokens=4, seed=1)
        assert response.status_code == 200, response.text
        prompt = served.tokenizer.decode(served.engine.requests[-1].prompt_token_ids)
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nSure, the answer is")
        assert served.engine.requests[-1].thinking is None  # the answer goes on as content
        assert response.json()["choices"][0]["message"]["content"].startswith("Sure, the answer is")
    streamed = chat(
        served, PREFILL, continue_final_message=True, echo=True, max_tokens=4, seed=1, stream=True
    )
    chunks = events(streamed.text)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert chunks[0]["choices"][0]["delta"]["content"] == "Sure, the answer is"
    assert content == response.json()["choices"][0]["message"]["content"]
    # Without echo the answer is only what the model added; a closed final message gets a new turn.
    plain = chat(served, PREFILL, continue_final_message=True, max_tokens=4, seed=1).json()
    assert not (plain["choices"][0]["message"]["content"] or "").startswith("Sure, the answer is")
    chat(served, PREFILL, max_tokens=1)
    assert served.tokenizer.decode(served.engine.requests[-1].prompt_token_ids).endswith("assistant\n")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"continue_final_message": True}, "continue_final_message"),
        ({"add_generation_prompt": False}, "add_generation_prompt"),
        (
            {"continue_final_message": True, "add_generation_prompt": True, "prefill": True},
            "add_generation_prompt",
        ),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"verbosity": "loud"}, "verbosity"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_wrong_chat_fields_are_refused(served: Served, body: dict[str, Any], param: str) -> None:
    messages = PREFILL if body.pop("prefill", False) else None
    response = chat(served, messages, **body, max_tokens=2)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("body", "thinking", "budget"),
    [
        ({"reasoning_effort": "none"}, False, None),
        ({"reasoning_effort": "minimal"}, False, None),
        ({"reasoning_effort": "low"}, True, 1024),
        ({"reasoning_effort": "medium"}, True, 4096),
        ({"reasoning_effort": "high"}, True, None),
        ({"reasoning_effort": "low", "thinking_budget": 7}, True, 7),
        ({"reasoning_effort": "high", **NO_THINK}, False, None),
    ],
)
def test_reasoning_effort_maps_to_thinking(
    served: Served, body: dict[str, Any], thinking: bool, budget: int | None
) -> None:
    response = chat(served, [{"role": "user", "content": "Hi /no_think"}], **body, max_tokens=2)
    assert response.status_code == 200, response.text
    sent = served.engine.requests[-1]
    assert (sent.thinking is not None) is thinking
    assert (sent.thinking.budget if sent.thinking else None) == budget
    if "chat_template_kwargs" in body:
        assert "reasoning_effort" in response.headers[WARNING]


def test_verbosity_and_text_modality_are_accepted(served: Served) -> None:
    response = chat(served, verbosity="low", modalities=["text"], max_tokens=2, **NO_THINK)
    assert response.status_code == 200 and "verbosity" in response.headers[WARNING]


# ---- unknown fields and the depth cap ----------------------------------------------------------------------


def test_unknown_fields_are_ignored_and_named(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="qwenkit.serve")
    extra = {"foo_bar": 1, "ключ": {"a": [1]}, "a\r\nX-Injected": "1"}
    for send in (chat, complete):
        response = send(served, **extra, max_tokens=2)
        assert response.status_code == 200, response.text
        warning = response.headers[WARNING]
        assert printable_ascii(warning) and "x-injected" not in response.headers
        assert warning.startswith("ignored unknown fields: ") and "foo_bar" in warning
        assert "\\u043a\\u043b\\u044e\\u0447" in warning and "a X-Injected" in warning
    logged = [r for r in caplog.records if "ignored unknown fields" in r.getMessage()]
    assert len(logged) == 2 and all(printable_ascii(r.getMessage()) for r in logged)
    # Nested objects still refuse unknown keys: a typo there changes behaviour silently otherwise.
    typo = chat(served, stream_options={"include_usage": True, "incude": 1}, max_tokens=2)
    assert typo.status_code == 400 and typo.json()["error"]["param"] == "stream_options.incude"


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_body_depth_cap(served: Served) -> None:
    # The body object is one level, so MAX_JSON_DEPTH - 1 lists inside fit exactly.
    fits = complete(served, extra_thing=nested(MAX_JSON_DEPTH - 1), max_tokens=2)
    assert fits.status_code == 200, fits.text
    for where in ("extra_thing", "prompt"):
        deep = complete(served, **{where: nested(MAX_JSON_DEPTH)}, max_tokens=2)
        assert deep.status_code == 400 and str(MAX_JSON_DEPTH) in deep.json()["error"]["message"]
    very_deep = served.client.post(
        "/v1/chat/completions",
        content=b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert very_deep.status_code == 400 and str(MAX_JSON_DEPTH) in very_deep.json()["error"]["message"]
    # Brackets inside strings are text, not depth.
    assert complete(served, prompt="[" * 200, max_tokens=2).status_code == 200


# ---- parallel_tool_calls: false (a real engine cannot be made to write two calls in auto mode) ----------

CALLS = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)
TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "get_time")
]


@pytest.mark.parametrize("chunk", [1, 7, 500])
def test_parallel_tool_calls_false_keeps_the_first_call(
    demo_checkpoint: Callable[..., Path], chunk: int
) -> None:
    tokenizer = QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny"))
    engine = FakeEngine(tokenizer, script=lambda request: CALLS, chunk=chunk)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "tools": TOOLS, **NO_THINK}
    with in_process(fake_app(engine)) as client:
        both = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert [c["function"]["name"] for c in both["tool_calls"]] == ["get_weather", "get_time"]
        one = client.post("/v1/chat/completions", json={**body, "parallel_tool_calls": False})
        message = one.json()["choices"][0]["message"]
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
        assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
        assert not message["content"] and one.json()["choices"][0]["finish_reason"] == "tool_calls"
        assert "parallel_tool_calls" in one.headers[WARNING]
        streamed = client.post(
            "/v1/chat/completions", json={**body, "parallel_tool_calls": False, "stream": True}
        )
        assert streamed.headers[WARNING] == one.headers[WARNING]
        calls: dict[int, dict[str, str]] = {}
        content = ""
        for c in events(streamed.text):
            delta = c["choices"][0]["delta"]
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                slot = calls.setdefault(call["index"], {"name": "", "arguments": ""})
                slot["name"] += call["function"].get("name") or ""
                slot["arguments"] += call["function"].get("arguments") or ""
        assert list(calls) == [0] and calls[0]["name"] == "get_weather" and not content
        assert calls[0]["arguments"] == message["tool_calls"][0]["function"]["arguments"]


# ---- through uvicorn/h11: headers from client text, cleanup, the event loop --------------------------------


@pytest.mark.parametrize("fmt", ["日付", "", "x ", "a\r\nX-Injected: 1", "a\x01b", "\u2028\x7f"])
@pytest.mark.parametrize("stream", [False, True])
def test_schema_format_text_in_the_warning_header(live: LiveServer, fmt: str, stream: bool) -> None:
    schema = {"type": "object", "properties": {"d": {"type": "string", "format": fmt}}}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "d", "schema": schema}},
        "max_tokens": 8,
        "stream": stream,
        **NO_THINK,
    }
    response = httpx.post(live.base_url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert "x-injected" not in response.headers
    for name, value in response.headers.items():
        assert printable_ascii(name) and (printable_ascii(value) or not value)
    if stream:
        assert events(response.text)[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    if fmt == "日付":
        assert "format: \\u65e5\\u4ed8" in response.headers[WARNING]


def test_a_stream_that_cannot_start_still_frees_its_slot(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("cannot build the response")

    monkeypatch.setattr(handlers_module, "StreamingResponse", broken)
    body = {
        "model": MODEL,
        "prompt": "Hello",
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": True,
    }
    response = httpx.post(live.base_url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 500
    # The engine request was aborted and forgotten before the answer went out, not left running.
    assert serve_context(live.app).active == set()


def test_planning_does_not_block_the_event_loop(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, health_done = threading.Event(), threading.Event()
    waited: list[bool] = []
    real_plan = app_module.plan_chat

    def slow_plan(*args: Any) -> Any:
        # Planning that lasts until /health was answered: were it on the event loop, /health could only be
        # answered once this gave up waiting.
        entered.set()
        waited.append(health_done.wait(timeout=30))
        return real_plan(*args)

    monkeypatch.setattr(app_module, "plan_chat", slow_plan)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, live.base_url + "/v1/chat/completions", json=body, timeout=90)
        assert entered.wait(timeout=60)
        assert httpx.get(live.base_url + "/health", timeout=90).status_code == 200
        health_done.set()
        assert pending.result().status_code == 200
    assert waited == [True]
