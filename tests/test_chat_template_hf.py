"""The demo checkpoints' own chat template, applied by transformers' AutoTokenizer, equals our renderer:
the same text byte for byte and the same token ids (LitGPT style: through the real loader)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from chat_cases import CASES, ChatCase
from qwenkit.chat.flavor import Flavor
from qwenkit.chat.messages import messages_from_openai, tools_from_openai
from qwenkit.chat.render import render
from qwenkit.tokenizer.tokenizer import QwenTokenizer

# Cases whose caller text contains markup tokens: HF turns them into special ids, we do not (by design).
# (Qwen2.5 has no think handling: think tags in its assistant history are caller text.)
INJECTION = {"injection_text", "user_tool_response_wrapper", "qwen25_system_multi_turn"}


@pytest.fixture(scope="module")
def tokenizers(demo_checkpoint: Callable[[str, str], Path]) -> dict[Flavor, tuple[Any, QwenTokenizer]]:
    out = {}
    for flavor, arch in ((Flavor.QWEN3, "qwen3"), (Flavor.QWEN2_5, "qwen2")):
        path = demo_checkpoint(arch, "tiny")
        out[flavor] = (AutoTokenizer.from_pretrained(path), QwenTokenizer.from_dir(path))
    return out


def test_enough_conformance_cases() -> None:
    assert len(CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_apply_chat_template_matches_renderer(
    case: ChatCase, tokenizers: dict[Flavor, tuple[Any, QwenTokenizer]]
) -> None:
    hf, ours = tokenizers[case.flavor]
    kwargs = case.render_kwargs
    text = hf.apply_chat_template(case.template_messages, tools=case.tools, tokenize=False, **kwargs)
    rendered = render(
        messages_from_openai(case.messages),
        tools_from_openai(case.tools) if case.tools else None,
        flavor=case.flavor,
        **kwargs,
    )
    assert text == rendered.text
    hf_ids = hf(text, add_special_tokens=False)["input_ids"]
    our_ids = ours.encode_parts(rendered.parts)
    if case.name in INJECTION:
        added = ours.added_token_ids
        assert sum(i in added for i in our_ids) < sum(i in added for i in hf_ids)
    else:
        assert our_ids == hf_ids
