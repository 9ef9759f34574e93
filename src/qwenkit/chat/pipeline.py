"""Chat ↔ engine: turn a conversation into a GenerationRequest, and generated text into reasoning,
content and tool calls.

Contract: prepare_chat() renders with the model's chat-template family (flavor: a family, its name or a
legacy Flavor; see chat/families), tokenizes with the injection guard (user text never
becomes special ids), picks Qwen's mode-dependent sampling defaults, opens the think block itself when a
grammar must wait for </think> (unless the family's prompt opened it already), and returns the request plus
a matching OutputParser factory. The parser splits a leading think block off whenever the family thinks,
whatever the mode (Qwen3 writes an empty one after /no_think), and starts inside the block when the prompt
opened it (Qwen3.5, Qwen3-2507 Thinking, QwQ). continue_final_message=True leaves the prompt open inside
the final assistant message (no generation prompt) and parses what follows as content. images: the decoded
images of the messages' image parts, in order; the prompt holds one <|image_pad|> per image (refused when
the counts differ, e.g. a template that drops images). The server and the CLI both use it, so the two
behave the same.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwenkit.chat.families import ChatFamily, FamilyLike, as_family
from qwenkit.chat.messages import ChatInputError, Message, Tool
from qwenkit.chat.parse import OutputParser
from qwenkit.chat.render import RenderedPrompt, render
from qwenkit.engines.request import GenerationRequest, Grammar, ImageInput, ThinkingControl
from qwenkit.engines.sampling import resolve_sampling
from qwenkit.tokenizer.parts import Special
from qwenkit.tokenizer.specials import ENDOFTEXT, IM_END, IMAGE_PAD, THINK_START
from qwenkit.tokenizer.tokenizer import QwenTokenizer


@dataclass(frozen=True)
class PreparedChat:
    request: GenerationRequest
    prompt: RenderedPrompt
    thinking: bool  # the mode in force: the engine tracks a think block, thinking sampling defaults
    think_opened: bool
    tools: tuple[dict[str, Any], ...]
    family: ChatFamily
    continued: bool = False  # the prompt continues the final assistant message: the output is content
    warnings: list[str] = field(default_factory=list)

    def parser(self, call_names: Collection[str] | None = None) -> OutputParser:
        """A parser for this turn's output; call_names limits which functions become calls (None: any)."""
        return self.family.output_parser(
            think_opened=self.think_opened,
            continued=self.continued,
            tools=self.tools or None,
            call_names=call_names,
        )


def prepare_chat(
    tokenizer: QwenTokenizer,
    messages: Sequence[Message],
    *,
    flavor: FamilyLike,
    tools: Sequence[Tool] | None = None,
    enable_thinking: bool | None = None,
    sampling: Mapping[str, object] | None = None,
    grammar: Grammar | None = None,
    logprobs: int | None = None,
    request_id: str | None = None,
    continue_final_message: bool = False,
    preserve_thinking: bool | None = None,
    reasoning_effort: str | None = None,
    images: Sequence[ImageInput] = (),
) -> PreparedChat:
    """The engine request for a chat turn, and how to parse what comes back.

    continue_final_message: continue the final assistant message (prefill) instead of starting a new turn.
    reasoning_effort: given to a template that reads it (Qwen3.8's); the thinking budget is set apart.
    """
    family = as_family(flavor)
    prompt = render(
        messages,
        tools,
        add_generation_prompt=not continue_final_message,
        continue_final_message=continue_final_message,
        enable_thinking=enable_thinking,
        preserve_thinking=preserve_thinking,
        reasoning_effort=reasoning_effort,
        flavor=family,
    )
    pads = sum(1 for p in prompt.parts if isinstance(p, Special) and p.token == IMAGE_PAD)
    if pads != len(images):
        raise ChatInputError(
            f"the prompt has {pads} image placeholder(s) for {len(images)} image(s): "
            "this model's chat template does not place images; send text only"
        )
    params, warnings = resolve_sampling(dict(sampling or {}), prompt.thinking)
    parts = list(prompt.parts)
    think_opened = prompt.think_opened
    if grammar is not None and prompt.thinking and grammar.after_think and not think_opened:
        # The grammar must wait for </think>: open the think block ourselves so the engine knows where it is.
        parts += [Special(THINK_START), "\n"]
        think_opened = True
    stop_ids = {tokenizer.special_id(IM_END), tokenizer.special_id(ENDOFTEXT), tokenizer.eos_token_id}
    request = GenerationRequest(
        request_id=request_id or f"chatcmpl-{uuid.uuid4().hex}",
        prompt_token_ids=tuple(tokenizer.encode_parts(parts)),
        sampling=params,
        stop_token_ids=frozenset(stop_ids),
        grammar=grammar,
        thinking=ThinkingControl(starts_inside=think_opened, budget=params.thinking_budget)
        if prompt.thinking
        else None,
        logprobs=logprobs,
        images=tuple(images),
    )
    return PreparedChat(
        request=request,
        prompt=prompt,
        thinking=prompt.thinking,
        think_opened=think_opened,
        tools=tuple(t.model_dump() for t in tools or ()),
        family=family,
        continued=continue_final_message,
        warnings=warnings,
    )
