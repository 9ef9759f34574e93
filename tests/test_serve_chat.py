"""Chat through the server with the official openai client, streamed and whole: Qwen3's leading think block
never reaches `content`, whatever switched thinking off (/no_think, enable_thinking false, a developer
message), and OpenAI's developer role is accepted as the system role. The think blocks come from a scripted
FakeEngine, since the demo model's random weights cannot be made to write one; the developer role runs on
the real tiny demo engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from qwenkit.chat.flavor import Flavor
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.serve.app import create_app
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import MODEL, FakeEngine, in_process

EMPTY_BLOCK = "<think>\n\n</think>\n\nHello!"
FULL_BLOCK = "<think>\nA greeting.\n</think>\n\nHello!"
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}

# (messages, extra body): every way a client turns Qwen3's thinking off, and the default.
SWITCHES = {
    "soft_no_think": ([{"role": "user", "content": "Hi /no_think"}], {}),
    "developer_no_think": (
        [{"role": "developer", "content": "/no_think"}, {"role": "user", "content": "Hi"}],
        {},
    ),
    "enable_thinking_false": ([{"role": "user", "content": "Hi"}], NO_THINK),
    "thinking_on": ([{"role": "user", "content": "Hi"}], {}),
}


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint: Callable[..., Path]) -> QwenTokenizer:
    return QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny"))


@pytest.fixture
def fake_client(tokenizer: QwenTokenizer) -> Iterator[Callable[..., openai.OpenAI]]:
    """fake_client(text, chunk, flavor) → an openai client on an app whose engine always writes text."""
    stack: list[Any] = []

    def build(text: str, chunk: int = 3, flavor: Flavor = Flavor.QWEN3) -> openai.OpenAI:
        engine = FakeEngine(tokenizer, script=lambda request: text, chunk=chunk)
        ctx = in_process(create_app(engine, tokenizer, flavor, MODEL))  # type: ignore[arg-type]
        stack.append(ctx)
        return client_for(ctx.__enter__())

    yield build
    for ctx in reversed(stack):
        ctx.__exit__(None, None, None)


def client_for(http: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://127.0.0.1/v1", api_key="unused", http_client=http, max_retries=0)


def whole_and_streamed(client: openai.OpenAI, messages: list[dict[str, Any]], extra: dict[str, Any]) -> Any:
    """(message, streamed content deltas, streamed reasoning deltas) for one request, asked both ways."""
    args: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": 16, "extra_body": extra}
    message = client.chat.completions.create(**args).choices[0].message
    content, reasoning = [], []
    for chunk in client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            reasoning.append((choice.delta.model_extra or {}).get("reasoning_content") or "")
    return message, content, reasoning


@pytest.mark.parametrize("switch", sorted(SWITCHES))
@pytest.mark.parametrize("chunk", [1, 4])
def test_empty_think_block_never_reaches_content(
    fake_client: Callable[..., openai.OpenAI], switch: str, chunk: int
) -> None:
    messages, extra = SWITCHES[switch]
    message, content, reasoning = whole_and_streamed(fake_client(EMPTY_BLOCK, chunk), messages, extra)
    assert message.content == "Hello!"
    assert (message.model_extra or {}).get("reasoning_content") is None
    assert "".join(content) == "Hello!" and not any(reasoning)
    assert not any("<" in piece or "think" in piece for piece in content)


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_think_block_written_anyway_is_reasoning(
    fake_client: Callable[..., openai.OpenAI], switch: str
) -> None:
    messages, extra = SWITCHES[switch]
    message, content, reasoning = whole_and_streamed(fake_client(FULL_BLOCK, 2), messages, extra)
    extra_fields = message.model_extra or {}
    assert (message.content, extra_fields.get("reasoning_content")) == ("Hello!", "A greeting.")
    assert ("".join(content), "".join(reasoning)) == ("Hello!", "A greeting.")


def test_flavour_without_think_tags_passes_them_through(fake_client: Callable[..., openai.OpenAI]) -> None:
    text = "<think>\nx\n</think>\n\ny"
    messages, extra = SWITCHES["thinking_on"]
    message, content, _ = whole_and_streamed(fake_client(text, 3, Flavor.QWEN2_5), messages, extra)
    assert message.content == "".join(content) == text


@pytest.fixture(scope="module")
def demo_client(demo_gguf: Callable[..., Path], tokenizer: QwenTokenizer) -> Iterator[openai.OpenAI]:
    engine = LlamaCppEngine(demo_gguf("qwen3", "tiny", "f32"), EngineConfig.for_workload(2, 1024, threads=2))
    with in_process(create_app(engine, tokenizer, Flavor.QWEN3, MODEL)) as http:
        yield client_for(http)


def test_developer_message_is_read_as_system_by_the_real_engine(demo_client: openai.OpenAI) -> None:
    def ask(first: dict[str, Any] | None, stream: bool = False) -> tuple[str, int]:
        messages = [*([first] if first else []), {"role": "user", "content": "Say hi."}]
        args: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}
        if not stream:
            response = demo_client.chat.completions.create(**args, extra_body=NO_THINK)
            assert response.usage is not None
            return response.choices[0].message.content or "", response.usage.prompt_tokens
        chunks = demo_client.chat.completions.create(
            **args, extra_body=NO_THINK, stream=True, stream_options={"include_usage": True}
        )
        text, prompt_tokens = "", 0
        for chunk in chunks:
            text += "".join(c.delta.content or "" for c in chunk.choices)
            prompt_tokens = chunk.usage.prompt_tokens if chunk.usage else prompt_tokens
        return text, prompt_tokens

    rules = "Answer in one short line, in English."
    as_developer = ask({"role": "developer", "content": rules})
    assert as_developer == ask({"role": "system", "content": rules})
    assert as_developer == ask({"role": "developer", "content": rules}, stream=True)
    # The developer text reached the prompt: it is longer than the prompt without it.
    assert as_developer[1] > ask(None)[1]
