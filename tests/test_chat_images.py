"""Image content parts in chat: parsing OpenAI's image_url parts, rendering them as each family's official
template does (Qwen3.5 byte for byte against its official template), the injection guard on the vision
markup, and prepare_chat handing the decoded images to the engine request in prompt order."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from official_templates import render_official, require_official_templates
from qwenkit.chat.families import QWEN2_5, QWEN3, QWEN3_5, JinjaTemplate
from qwenkit.chat.families.base import IMAGE_MARKUP
from qwenkit.chat.messages import ChatInputError, ImagePart, image_parts, messages_from_openai
from qwenkit.chat.pipeline import prepare_chat
from qwenkit.chat.render import render
from qwenkit.engines.request import ImageInput
from qwenkit.tokenizer.parts import Special
from qwenkit.tokenizer.specials import IMAGE_PAD
from qwenkit.tokenizer.tokenizer import QwenTokenizer

URL = "data:image/png;base64,iVBORw0KGgo="


def image(url: str = URL, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = {
    "one image then a question": (
        [{"role": "user", "content": [image(), text("What is in this picture?")]}],
        None,
    ),
    "text around two images, trimmed": (
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [text("  Compare "), image(), text(" with "), image(), text(" please.\n ")],
            },
        ],
        None,
    ),
    "image only, then a follow-up": (
        [
            {"role": "user", "content": [image(detail="low")]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "What colour is it?"},
        ],
        None,
    ),
    "whitespace-only text at the ends": (
        [{"role": "user", "content": [text("   "), image(), text("\n\n")]}],
        None,
    ),
    "a tool result with a screenshot": (
        [
            {"role": "user", "content": "Take a screenshot."},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "shot", "arguments": {}}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": [text("Here: "), image()]},
        ],
        [
            {
                "type": "function",
                "function": {"name": "shot", "parameters": {"type": "object", "properties": {}}},
            }
        ],
    ),
}


@pytest.fixture(scope="module")
def qwen35_official() -> str:
    return require_official_templates()["Qwen3.5-4B"]


@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
@pytest.mark.parametrize("thinking", [None, False])
def test_qwen3_5_images_equal_the_official_template(
    case: str, thinking: bool | None, qwen35_official: str
) -> None:
    raw, tools = CONVERSATIONS[case]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    ours = render(messages_from_openai(raw), _tools(tools), flavor=QWEN3_5, **kwargs)
    theirs = render_official(qwen35_official, raw, tools, add_generation_prompt=True, **kwargs)
    assert ours.text == theirs
    pads = [p for p in ours.parts if isinstance(p, Special) and p.token == IMAGE_PAD]
    assert len(pads) == len(image_parts(messages_from_openai(raw))) > 0


def _tools(tools: list[dict[str, Any]] | None) -> Any:
    from qwenkit.chat.messages import tools_from_openai

    return tools_from_openai(tools) if tools else None


def test_the_official_template_in_the_sandbox_renders_images_as_markup(qwen35_official: str) -> None:
    # A template no family matches is run by its own Jinja: the vision markup it writes must come back as
    # Special parts, as with the families.
    raw = [{"role": "user", "content": [text("See "), image(), text(" here.")]}]
    own = JinjaTemplate(qwen35_official)
    ours = own.render(messages_from_openai(raw))
    assert ours.text == render(messages_from_openai(raw), flavor=QWEN3_5).text
    assert sum(isinstance(p, Special) and p.token == IMAGE_PAD for p in ours.parts) == 1


@pytest.mark.parametrize("family", [QWEN3, QWEN2_5], ids=lambda f: f.name)
def test_hermes_families_place_images_inline_as_the_vl_templates_do(family: Any) -> None:
    # Qwen2.5-VL and Qwen3-VL write each image's markup where it stands and join the parts with nothing:
    # the same text as if the user had typed the markup, but the markup is Special, not user text.
    with_images = messages_from_openai(
        [{"role": "user", "content": [text("Look: "), image(), text(" what?")]}]
    )
    spelled = messages_from_openai([{"role": "user", "content": f"Look: {IMAGE_MARKUP} what?"}])
    ours, typed = render(with_images, flavor=family), render(spelled, flavor=family)
    assert ours.text == typed.text
    assert sum(isinstance(p, Special) and p.token == IMAGE_PAD for p in ours.parts) == 1
    assert not any(isinstance(p, Special) and p.token == IMAGE_PAD for p in typed.parts)


def test_typed_markup_never_becomes_an_image(demo_checkpoint: Callable[..., Path]) -> None:
    tokenizer = QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny"))
    pad = tokenizer.special_id(IMAGE_PAD)
    typed = render(messages_from_openai([{"role": "user", "content": f"x {IMAGE_MARKUP} y"}]), flavor=QWEN3_5)
    real = render(
        messages_from_openai([{"role": "user", "content": [text("x "), image(), text(" y")]}]), flavor=QWEN3_5
    )
    assert pad not in tokenizer.encode_parts(typed.parts)
    assert tokenizer.encode_parts(real.parts).count(pad) == 1


def test_parsing_image_parts() -> None:
    [m] = messages_from_openai([{"role": "user", "content": [text("a"), image(detail="high"), text("b")]}])
    assert m.content == "ab" and m.parts == ("a", ImagePart(url=URL, detail="high"), "b")
    assert m.to_openai()["content"][1] == image(detail="high")
    [plain] = messages_from_openai([{"role": "user", "content": [text("a"), text("b")]}])
    assert plain.content == "a\nb" and plain.parts is None  # text parts alone: joined as before
    bare = messages_from_openai([{"role": "user", "content": [{"type": "image_url", "image_url": URL}]}])
    assert image_parts(bare) == [ImagePart(url=URL)]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"role": "system", "content": [image()]}, "system messages cannot contain images"),
        ({"role": "assistant", "content": [image()]}, "assistant messages cannot contain images"),
        ({"role": "user", "content": [image(detail="ultra")]}, "detail must be one of auto, low, high"),
        ({"role": "user", "content": [image(crop=1)]}, "unknown key 'crop'"),
        ({"role": "user", "content": [{"type": "image_url"}]}, "an image_url part needs"),
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]},
            "an image_url part needs",
        ),
    ],
)
def test_bad_image_parts(raw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ChatInputError, match=fragment) as info:
        messages_from_openai([raw])
    assert "\n" not in str(info.value)


def _input(seed: int) -> ImageInput:
    pixels = np.full((32, 32, 3), seed, dtype=np.uint8)
    return ImageInput(pixels=pixels, sha256=str(seed))


def test_prepare_chat_hands_the_images_over_in_order(demo_checkpoint: Callable[..., Path]) -> None:
    tokenizer = QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny"))
    messages = messages_from_openai([{"role": "user", "content": [image(), text("and"), image()]}])
    images = [_input(1), _input(2)]
    prepared = prepare_chat(tokenizer, messages, flavor=QWEN3_5, images=images)
    assert prepared.request.images == tuple(images)
    assert prepared.request.prompt_token_ids.count(tokenizer.special_id(IMAGE_PAD)) == 2
    with pytest.raises(ChatInputError, match="2 image placeholder"):
        prepare_chat(tokenizer, messages, flavor=QWEN3_5, images=images[:1])
