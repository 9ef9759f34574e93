"""qwenkit.chat.pipeline.prepare_chat: the parser it hands out splits a leading think block off whatever the
thinking mode (Qwen3 writes an empty one after /no_think), and continue_final_message leaves the prompt open
inside the final assistant message."""

from __future__ import annotations

from typing import Any

import pytest

from qwenkit.chat.flavor import Flavor
from qwenkit.chat.messages import messages_from_openai
from qwenkit.chat.parse import ParsedOutput, accumulate
from qwenkit.chat.pipeline import PreparedChat, prepare_chat
from qwenkit.chat.render import render
from qwenkit.tokenizer.tokenizer import QwenTokenizer


@pytest.fixture(scope="module")
def tokenizer() -> QwenTokenizer:
    return QwenTokenizer.builtin()


def prepare(tokenizer: QwenTokenizer, messages: list[dict[str, Any]], **kwargs: Any) -> PreparedChat:
    kwargs.setdefault("flavor", Flavor.QWEN3)
    return prepare_chat(tokenizer, messages_from_openai(messages), **kwargs)


def parse(prepared: PreparedChat, text: str, chunk: int) -> ParsedOutput:
    parser = prepared.parser()
    deltas = [parser.feed(text[i : i + chunk]) for i in range(0, len(text), chunk)]
    return accumulate([*deltas, parser.finish()])


# Every way thinking can be off or on for Qwen3: the same output must parse the same.
MODES = [
    pytest.param([{"role": "user", "content": "Hi /no_think"}], {}, False, id="soft_no_think"),
    pytest.param(
        [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "Hi"}],
        {},
        False,
        id="system_no_think",
    ),
    pytest.param(
        [{"role": "user", "content": "Hi"}], {"enable_thinking": False}, False, id="enable_thinking_false"
    ),
    pytest.param([{"role": "user", "content": "Hi"}], {}, True, id="default_on"),
    pytest.param([{"role": "user", "content": "Hi /think"}], {}, True, id="soft_think"),
]


# What Qwen3 may write in any mode, and what the parser must make of it.
OUTPUTS = [
    ("<think>\n\n</think>\n\nHello!", ParsedOutput(None, "Hello!", [], False)),
    ("\n<think></think>Hello!", ParsedOutput(None, "Hello!", [], False)),
    ("<think>\nA greeting.\n</think>\n\nHello!", ParsedOutput("A greeting.", "Hello!", [], False)),
    ("Plain answer, no block.", ParsedOutput(None, "Plain answer, no block.", [], False)),
]


@pytest.mark.parametrize(("messages", "kwargs", "thinking"), MODES)
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_leading_think_block_is_split_off_in_every_mode(
    tokenizer: QwenTokenizer,
    messages: list[dict[str, Any]],
    kwargs: dict[str, Any],
    thinking: bool,
    chunk: int,
) -> None:
    prepared = prepare(tokenizer, messages, **kwargs)
    assert prepared.thinking is thinking
    for text, expected in OUTPUTS:
        assert parse(prepared, text, chunk) == expected, text


def test_qwen25_keeps_think_text_as_content(tokenizer: QwenTokenizer) -> None:
    prepared = prepare(tokenizer, [{"role": "user", "content": "Hi"}], flavor=Flavor.QWEN2_5)
    text = "<think>\nx\n</think>\n\ny"
    assert parse(prepared, text, 2) == ParsedOutput(None, text, [], False)


CONTINUED = [
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "The smallest is"},
]


def test_continue_final_message_prompt_is_open(tokenizer: QwenTokenizer) -> None:
    prepared = prepare(tokenizer, CONTINUED, continue_final_message=True, sampling={"temperature": 0})
    expected = render(
        messages_from_openai(CONTINUED), add_generation_prompt=False, continue_final_message=True
    )
    assert prepared.prompt == expected
    assert prepared.prompt.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nThe smallest is")
    assert list(prepared.request.prompt_token_ids) == tokenizer.encode_parts(expected.parts)
    # What follows is content: no think block for the engine to track, greedy allowed, tags stay text.
    assert prepared.thinking is False and prepared.request.thinking is None
    assert prepared.request.sampling.temperature == 0 and not prepared.warnings
    assert parse(prepared, " two.", 1) == ParsedOutput(None, " two.", [], False)
    assert parse(prepared, "<think>x</think>", 1) == ParsedOutput(None, "<think>x</think>", [], False)


def test_new_turn_after_assistant_message_is_not_a_continuation(tokenizer: QwenTokenizer) -> None:
    prepared = prepare(tokenizer, CONTINUED)
    assert prepared.prompt.text.endswith("The smallest is<|im_end|>\n<|im_start|>assistant\n")
    assert prepared.thinking is True


# Families whose prompt opens the think block: the output holds only </think>.
@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_thinking_2507", "qwq"])
@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_prompt_opened_think_block(tokenizer: QwenTokenizer, family: str, chunk: int) -> None:
    from qwenkit.engines.request import Grammar
    from qwenkit.tokenizer.specials import THINK_START

    prepared = prepare(tokenizer, [{"role": "user", "content": "Hi"}], flavor=family)
    assert prepared.think_opened and prepared.request.thinking is not None
    assert prepared.request.thinking.starts_inside
    assert parse(prepared, "A greeting.\n</think>\n\nHello!", chunk) == ParsedOutput(
        "A greeting.", "Hello!", [], False
    )
    # A grammar that waits for </think> must not open a second block.
    with_grammar = prepare(
        tokenizer, [{"role": "user", "content": "Hi"}], flavor=family, grammar=Grammar('root ::= "ok"')
    )
    think_id = tokenizer.special_id(THINK_START)
    assert with_grammar.request.prompt_token_ids.count(think_id) == 1
    assert with_grammar.request.prompt_token_ids == prepared.request.prompt_token_ids


def test_prompt_closed_think_block_parses_as_content(tokenizer: QwenTokenizer) -> None:
    prepared = prepare(
        tokenizer, [{"role": "user", "content": "Hi"}], flavor="qwen3_5", enable_thinking=False
    )
    assert not prepared.think_opened and prepared.request.thinking is None
    assert parse(prepared, "Hello!", 2) == ParsedOutput(None, "Hello!", [], False)
