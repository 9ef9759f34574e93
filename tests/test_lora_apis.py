"""LoRA adapters on every API, not only OpenAI's: with adapters loaded (`serve --lora name=DIR`), the model
"M:name" selects the adapter on Anthropic's /v1/messages, the Responses API and Ollama's /api/chat and
/api/generate, and each answers with `model` = "M:name" (streamed events too); /api/tags lists the
adapters with their base as parent_model. The adapter is resolved once (handlers.adapter_of), so an
Ollama answer equals the OpenAI chat answer of the same adapter token for token.

The tiny qwen3 demo and two random-weight adapters, built by tests/test_lora.py's fixtures; the official
`anthropic` and `openai` SDKs talk to the app in process (their http_client is the app's TestClient).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from fastapi.testclient import TestClient

from qwenkit.chat.flavor import Flavor
from qwenkit.serve.app import create_app
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import in_process
from test_lora import (
    MODEL,
    Files,
    files,  # noqa: F401  (a module fixture: the demo base and its adapters)
    loras,  # noqa: F401  (a module fixture: the adapters as llama.cpp LoRA GGUFs)
    new_engine,
)

MODELS = [MODEL, f"{MODEL}:plain", f"{MODEL}:rs"]
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def http(files: Files, loras: dict[str, Path]) -> Iterator[TestClient]:  # noqa: F811
    tokenizer = QwenTokenizer.from_dir(files.base_dir)
    app = create_app(new_engine(files.base, loras), tokenizer, Flavor.QWEN3, MODEL, adapters=tuple(loras))
    with in_process(app) as client:
        yield client


def sse_data(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_anthropic_and_responses_name_the_adapter(http: TestClient) -> None:
    # plan_chat resolves the adapter for every API (the Ollama test below shows it is used); here: the name.
    rs = f"{MODEL}:rs"
    claude = anthropic.Anthropic(base_url=str(http.base_url), api_key="unused", http_client=http)
    assert claude.messages.create(model=rs, max_tokens=2, messages=HELLO).model == rs  # type: ignore[arg-type]
    body = {"model": rs, "max_tokens": 2, "messages": HELLO, "stream": True}
    started = sse_data(http.post("/v1/messages", json=body).text)[0]
    assert started["type"] == "message_start" and started["message"]["model"] == rs
    client = openai.OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http)
    assert client.responses.create(model=rs, input="Hi", max_output_tokens=2).model == rs
    with client.responses.stream(model=rs, input="Hi", max_output_tokens=2) as stream:
        models = [e.response.model for e in stream if e.type in ("response.created", "response.completed")]
    assert models == [rs, rs]


def test_ollama_selects_and_lists_the_adapters(http: TestClient) -> None:
    tags = http.get("/api/tags").json()["models"]
    assert [(m["model"], m["details"]["parent_model"]) for m in tags] == [
        (MODEL, ""),
        (f"{MODEL}:plain", MODEL),
        (f"{MODEL}:rs", MODEL),
    ]
    shown = http.post("/api/show", json={"model": f"{MODEL}:rs"})
    assert shown.status_code == 200 and shown.json()["details"]["parent_model"] == MODEL
    texts = {}
    for model in MODELS:
        options = {"num_predict": 8, "temperature": 0}
        body = {"model": model, "messages": HELLO, "think": False, "options": options, "stream": False}
        chat = http.post("/api/chat", json=body).json()
        assert chat["model"] == model and chat["eval_count"] == 8, chat
        texts[model] = chat["message"]["content"]
    assert len(set(texts.values())) == 3
    # The OpenAI path picks the same adapter for the name: the same tokens.
    native = {
        "model": f"{MODEL}:plain",
        "messages": HELLO,
        "max_tokens": 8,
        "temperature": 0,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    openai_chat = http.post("/v1/chat/completions", json=native).json()
    assert openai_chat["choices"][0]["message"]["content"] == texts[f"{MODEL}:plain"]
    generate = {"model": f"{MODEL}:rs", "prompt": "Once", "options": {"num_predict": 2}}
    lines = [json.loads(line) for line in http.post("/api/generate", json=generate).text.splitlines()]
    assert lines[-1]["done"] and {line["model"] for line in lines} == {f"{MODEL}:rs"}
    missing = http.post("/api/chat", json={"model": f"{MODEL}:nope", "messages": HELLO})
    assert missing.status_code == 404 and f"'{MODEL}:plain'" in missing.json()["error"]
