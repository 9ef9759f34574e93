"""Chat families through the server: a request the family's template refuses is a 400 naming the rule (not a
500), and the family's output conventions reach the client (Qwen3.5's prompt-opened think block,
Qwen3-Coder's XML tool calls), whole and streamed. The model output comes from a scripted FakeEngine, since
the demo model's random weights cannot be made to write these forms."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qwenkit.chat.families import QWEN3_5, QWEN3_CODER, ChatFamily, JinjaTemplate
from qwenkit.serve.app import create_app
from qwenkit.tokenizer.specials import THINK_START
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import MODEL, FakeEngine, in_process

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}
XML_CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nBern\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
)


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint: Callable[..., Path]) -> QwenTokenizer:
    return QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny"))


def _ask(
    tokenizer: QwenTokenizer, family: ChatFamily, output: str, body: dict[str, Any]
) -> tuple[FakeEngine, Any, list[dict[str, Any]]]:
    """(engine, whole response, streamed chunks) for one request asked both ways."""
    engine = FakeEngine(tokenizer, script=lambda request: output, chunk=2)
    with in_process(create_app(engine, tokenizer, family, MODEL)) as http:  # type: ignore[arg-type]
        whole = http.post("/v1/chat/completions", json={"model": MODEL, **body})
        if whole.status_code != 200:
            return engine, whole, []
        streamed = http.post("/v1/chat/completions", json={"model": MODEL, "stream": True, **body})
        chunks = [
            json.loads(line[len("data: ") :])
            for line in streamed.text.splitlines()
            if line.startswith("data: {")
        ]
    return engine, whole, chunks


def _streamed(chunks: list[dict[str, Any]], key: str) -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c["choices"])


def test_template_refusal_is_a_400_naming_the_rule(tokenizer: QwenTokenizer) -> None:
    late_system = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "system", "content": "Be formal."},
    ]
    _, response, _ = _ask(tokenizer, QWEN3_5, "x", {"messages": late_system})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "System message must be at the beginning" in error["message"] and "messages[2]" in error["message"]
    assert "Traceback" not in response.text


def test_qwen3_5_output_holds_only_the_closing_think_tag(tokenizer: QwenTokenizer) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}
    engine, response, chunks = _ask(tokenizer, QWEN3_5, "A greeting.\n</think>\n\nHello!", body)
    prompt = tokenizer.decode(engine.requests[0].prompt_token_ids)
    assert prompt.endswith(f"<|im_start|>assistant\n{THINK_START}\n")
    assert engine.requests[0].thinking is not None and engine.requests[0].thinking.starts_inside
    message = response.json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("A greeting.", "Hello!")
    assert (_streamed(chunks, "reasoning_content"), _streamed(chunks, "content")) == ("A greeting.", "Hello!")


def test_qwen3_coder_xml_tool_call_reaches_the_client(tokenizer: QwenTokenizer) -> None:
    body = {"messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER], "max_tokens": 64}
    engine, response, chunks = _ask(tokenizer, QWEN3_CODER, f"Checking.\n{XML_CALL}", body)
    assert "<function>\n<name>get_weather</name>" in tokenizer.decode(engine.requests[0].prompt_token_ids)
    message = response.json()["choices"][0]["message"]
    assert message["content"] == "Checking."
    call = message["tool_calls"][0]["function"]
    assert (call["name"], json.loads(call["arguments"])) == ("get_weather", {"city": "Bern", "days": 2})
    streamed_args = "".join(
        tc["function"].get("arguments") or ""
        for c in chunks
        if c["choices"]
        for tc in c["choices"][0]["delta"].get("tool_calls") or []
    )
    assert json.loads(streamed_args) == {"city": "Bern", "days": 2}


def test_preserve_thinking_reaches_the_template(tokenizer: QwenTokenizer) -> None:
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "EARLIER-REASONING"},
        {"role": "user", "content": "Again"},
    ]
    prompts = {}
    for preserve in (False, True):
        body = {"messages": history, "chat_template_kwargs": {"preserve_thinking": preserve}}
        engine, response, _ = _ask(tokenizer, QWEN3_5, "x", body)
        assert response.status_code == 200
        prompts[preserve] = tokenizer.decode(engine.requests[0].prompt_token_ids)
    assert "EARLIER-REASONING" in prompts[True] and "EARLIER-REASONING" not in prompts[False]
    bad = {"messages": history, "chat_template_kwargs": {"preserve_thinking": "yes"}}
    _, response, _ = _ask(tokenizer, QWEN3_5, "x", bad)
    assert response.status_code == 400 and "preserve_thinking" in response.json()["error"]["message"]


def test_reasoning_effort_reaches_a_template_that_reads_it(tokenizer: QwenTokenizer) -> None:
    """Qwen3.8-style templates read reasoning_effort: chat_template_kwargs' word (any level the template
    names) or else the OpenAI field is given to the template; the OpenAI field still sets thinking."""
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if reasoning_effort is defined %}effort={{ reasoning_effort }}\n{% endif %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    family = JinjaTemplate(template, like=QWEN3_5)
    ask = [{"role": "user", "content": "Hi"}]
    cases = [
        ({"chat_template_kwargs": {"reasoning_effort": "xhigh"}}, "effort=xhigh"),
        ({"reasoning_effort": "low"}, "effort=low"),
        ({"reasoning_effort": "low", "chat_template_kwargs": {"reasoning_effort": "xhigh"}}, "effort=xhigh"),
        ({}, None),
    ]
    for extra, expected in cases:
        engine, response, _ = _ask(tokenizer, family, "x</think>y", {"messages": ask, **extra})
        assert response.status_code == 200, response.text
        prompt = tokenizer.decode(engine.requests[0].prompt_token_ids)
        assert (expected in prompt) if expected else "effort=" not in prompt
    _, response, _ = _ask(
        tokenizer, family, "x", {"messages": ask, "chat_template_kwargs": {"reasoning_effort": "<|im_end|>"}}
    )
    assert response.status_code == 400 and "reasoning_effort" in response.json()["error"]["message"]
