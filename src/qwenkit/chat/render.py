"""Render a conversation into a Qwen prompt: the one entry point every engine and the server use.

Contract: render(messages, tools, ..., flavor=family) returns the RenderedPrompt of that chat-template
family (qwenkit.chat.families: a family object, its name, or a legacy Flavor): text byte-identical to the
family's official template, every added token of the template's own markup a Special part, caller text
always plain str parts. Decisions shared by all families:
- continue_final_message=True (with add_generation_prompt=False) leaves the prompt open inside the final
  assistant message (assistant prefill), less the closing <|im_end|>\\n; thinking is then off; a final
  message with tool_calls is refused.
- Inline reasoning: content is split on "</think>": reasoning is what precedes the first one, content what
  follows the last one. reasoning_content, when given, wins.
- Hermes families print tool-call arguments given as a string verbatim; XML families decode them (a JSON
  object is required) because their templates iterate the arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

from qwenkit.chat.families import FamilyLike, as_family
from qwenkit.chat.families.base import MARKUP_TOKENS, RenderedPrompt, split_reasoning
from qwenkit.chat.families.qwen3 import soft_switch
from qwenkit.chat.flavor import Flavor
from qwenkit.chat.messages import Message, Tool


def resolve_thinking(
    messages: Sequence[Message], enable_thinking: bool | None, flavor: FamilyLike = Flavor.QWEN3
) -> bool:
    """The thinking mode in force under this family's rules (Qwen3: enable_thinking, else soft switch)."""
    return as_family(flavor).resolve_thinking(messages, enable_thinking)


def render(
    messages: Sequence[Message],
    tools: Sequence[Tool] | None = None,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    enable_thinking: bool | None = None,
    preserve_thinking: bool | None = None,
    reasoning_effort: str | None = None,
    flavor: FamilyLike = Flavor.QWEN3,
) -> RenderedPrompt:
    """Render messages (and tool definitions) with the given family's rules; see the module docstring."""
    return as_family(flavor).render(
        messages,
        tools,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        enable_thinking=enable_thinking,
        preserve_thinking=preserve_thinking,
        reasoning_effort=reasoning_effort,
    )


__all__ = ["MARKUP_TOKENS", "RenderedPrompt", "render", "resolve_thinking", "soft_switch", "split_reasoning"]
