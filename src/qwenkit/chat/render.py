"""Render a conversation into a Qwen prompt: the one renderer every engine and the server use.

Contract: render(messages, tools, ...) returns a RenderedPrompt whose text is byte-identical to the Jinja
template of the same flavour (templates/<flavor>.jinja, applied by transformers) and whose parts mark every
added token the renderer's own markup emits (<|im_start|>, <|im_end|>, <think>, </think>, <tool_call>,
</tool_call>, <tool_response>, </tool_response>) as Special. Message, tool and document text is always a plain
str part, so it can never become special ids. Adjacent text is merged: each str part is exactly one run
between two added tokens, as a tokenizer splitting the joined text would see it.

Decisions (they match the official templates):
- A conversation ending with an assistant message still gets a fresh generation prompt when
  add_generation_prompt is True. continue_final_message=True (with add_generation_prompt=False) leaves the
  prompt open inside that message instead (assistant prefill): its turn exactly as the template renders it,
  less the closing <|im_end|>\n, as transformers' continue_final_message does. What follows is content (a
  think block in that turn is closed), so thinking is off; a final message with tool_calls is refused.
- Tool messages need no preceding assistant tool call. If no real user query exists, no assistant turn
  gets think tags.
- Inline reasoning: content is split on "</think>": reasoning is what precedes the first one, content what
  follows the last one. reasoning_content, when given, wins and the content is left as is.
- QWEN2_5 renders tool-call arguments like QWEN3 (a string verbatim, not JSON-encoded a second time).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from qwenkit.chat.flavor import QWEN2_5_DEFAULT_SYSTEM, Flavor
from qwenkit.chat.messages import ChatInputError, Message, Tool
from qwenkit.tokenizer.parts import Part, Special, join_parts
from qwenkit.tokenizer.specials import (
    IM_END,
    IM_START,
    THINK_END,
    THINK_START,
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_RESPONSE_END,
    TOOL_RESPONSE_START,
)

MARKUP_TOKENS: frozenset[str] = frozenset(
    {
        IM_START,
        IM_END,
        THINK_START,
        THINK_END,
        TOOL_CALL_START,
        TOOL_CALL_END,
        TOOL_RESPONSE_START,
        TOOL_RESPONSE_END,
    }
)

# A switch is a whole word: not part of a path ("a/think") or a longer word ("/thinking").
_SOFT_SWITCH = re.compile(r"(?<![\w/])/(think|no_think)(?!\w)")

_TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
)
_TOOL_CALL_EXAMPLE = '\n{"name": <function-name>, "arguments": <args-json-object>}\n'


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """A rendered prompt: parts (text runs and Special markers) and the thinking mode in force."""

    parts: tuple[Part, ...]
    thinking: bool

    @property
    def text(self) -> str:
        """The prompt string (what the Jinja template produces)."""
        return join_parts(self.parts)


class _Builder:
    def __init__(self) -> None:
        self.parts: list[Part] = []

    def text(self, s: str) -> None:
        if not s:
            return
        if self.parts and isinstance(self.parts[-1], str):
            self.parts[-1] += s
        else:
            self.parts.append(s)

    def special(self, token: str) -> None:
        self.parts.append(Special(token))


def soft_switch(text: str) -> bool | None:
    """The last /think (True) or /no_think (False) switch in text, or None when there is none."""
    found = _SOFT_SWITCH.findall(text)
    return None if not found else found[-1] == "think"


def resolve_thinking(messages: Sequence[Message], enable_thinking: bool | None, flavor: Flavor) -> bool:
    """The thinking mode in force: enable_thinking, else the latest system/user soft switch, else on."""
    if not flavor.thinks:
        return False
    if enable_thinking is not None:
        return enable_thinking
    for message in reversed(messages):
        if message.role in ("system", "user") and message.content:
            switch = soft_switch(message.content)
            if switch is not None:
                return switch
    return True


def split_reasoning(message: Message) -> tuple[str, str]:
    """(reasoning, content) of an assistant message: reasoning_content, else inline <think>...</think>."""
    content = message.content or ""
    if message.reasoning_content is not None:
        return message.reasoning_content, content
    if THINK_END not in content:
        return "", content
    pieces = content.split(THINK_END)
    reasoning = pieces[0].rstrip("\n").split(THINK_START)[-1].lstrip("\n")
    return reasoning, pieces[-1].lstrip("\n")


def _is_tool_response_wrapper(text: str) -> bool:
    return text.startswith(TOOL_RESPONSE_START) and text.endswith(TOOL_RESPONSE_END)


def _last_query_index(messages: Sequence[Message]) -> int:
    # Without a real user query the index stays at the last message, so no turn is "after" it.
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m.role == "user" and not _is_tool_response_wrapper(m.content or ""):
            return i
    return len(messages) - 1


def _tools_system_turn(out: _Builder, system: str | None, tools: Sequence[Tool]) -> None:
    out.special(IM_START)
    out.text("system\n")
    if system is not None:
        out.text(system + "\n\n")
    out.text(_TOOLS_HEAD)
    for tool in tools:
        out.text("\n" + tool.to_json())
    out.text(_TOOLS_TAIL)
    out.special(TOOL_CALL_START)
    out.special(TOOL_CALL_END)
    out.text(" XML tags:\n")
    out.special(TOOL_CALL_START)
    out.text(_TOOL_CALL_EXAMPLE)
    out.special(TOOL_CALL_END)
    out.special(IM_END)
    out.text("\n")


def _plain_turn(out: _Builder, role: str, content: str) -> None:
    out.special(IM_START)
    out.text(f"{role}\n{content}")
    out.special(IM_END)
    out.text("\n")


def _assistant_turn(out: _Builder, message: Message, think_tags: bool, is_last: bool, flavor: Flavor) -> None:
    reasoning, content = split_reasoning(message)
    out.special(IM_START)
    out.text("assistant\n")
    if flavor is Flavor.QWEN3 and think_tags and (is_last or reasoning):
        out.special(THINK_START)
        out.text("\n" + reasoning.strip("\n") + "\n")
        out.special(THINK_END)
        out.text("\n\n" + content.lstrip("\n"))
    else:
        out.text(content)
    for j, call in enumerate(message.tool_calls):
        # The newline test uses the content before lstrip, as the official template does.
        if j > 0 or content:
            out.text("\n")
        out.special(TOOL_CALL_START)
        out.text(f'\n{{"name": "{call.name}", "arguments": {call.arguments_json()}}}\n')
        out.special(TOOL_CALL_END)
    out.special(IM_END)
    out.text("\n")


def _check_inputs(messages: Sequence[Message], tools: Sequence[Tool] | None, flavor: Flavor | str) -> Flavor:
    if not messages:
        raise ChatInputError("no messages to render: give at least one message (e.g. a user message)")
    for i, m in enumerate(messages):
        if not isinstance(m, Message):
            raise ChatInputError(
                f"messages[{i}] is a {type(m).__name__}, not a Message: use messages_from_openai()"
            )
    for i, t in enumerate(tools or ()):
        if not isinstance(t, Tool):
            raise ChatInputError(
                f"tools[{i}] is a {type(t).__name__}, not a Tool: build tools with tools_from_openai()"
            )
    try:
        return Flavor(flavor)
    except ValueError:
        raise ChatInputError(
            f"unknown chat flavor {flavor!r}: use one of {', '.join(f.value for f in Flavor)}"
        ) from None


def _check_continuable(messages: Sequence[Message], add_generation_prompt: bool) -> None:
    if add_generation_prompt:
        raise ChatInputError(
            "continue_final_message and add_generation_prompt cannot both be true: "
            "pass add_generation_prompt=False to continue the final message"
        )
    last = messages[-1]
    if last.role != "assistant":
        raise ChatInputError(
            f"continue_final_message needs the conversation to end with an assistant message to continue, "
            f"not a {last.role} message"
        )
    if last.tool_calls:
        raise ChatInputError(
            "continue_final_message cannot continue an assistant message that has tool_calls: "
            "only its text can be continued"
        )


def render(
    messages: Sequence[Message],
    tools: Sequence[Tool] | None = None,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    enable_thinking: bool | None = None,
    flavor: Flavor = Flavor.QWEN3,
) -> RenderedPrompt:
    """Render messages (and tool definitions) into a Qwen prompt; see the module docstring for the rules."""
    flavor = _check_inputs(messages, tools, flavor)
    if continue_final_message:
        _check_continuable(messages, add_generation_prompt)
    out = _Builder()
    first_system = messages[0].content if messages[0].role == "system" else None
    if flavor is Flavor.QWEN2_5 and first_system is None:
        system: str | None = QWEN2_5_DEFAULT_SYSTEM
    else:
        system = first_system
    if tools:
        _tools_system_turn(out, system, tools)
    elif system is not None:
        _plain_turn(out, "system", system)

    last_query = _last_query_index(messages)
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if m.role == "system":
            if i > 0:
                _plain_turn(out, "system", m.content or "")
        elif m.role == "user":
            _plain_turn(out, "user", m.content or "")
        elif m.role == "assistant":
            _assistant_turn(out, m, think_tags=i > last_query, is_last=i == last, flavor=flavor)
        else:  # a run of tool results shares one user turn
            if i == 0 or messages[i - 1].role != "tool":
                out.special(IM_START)
                out.text("user")
            out.text("\n")
            out.special(TOOL_RESPONSE_START)
            out.text("\n" + (m.content or "") + "\n")
            out.special(TOOL_RESPONSE_END)
            if i == last or messages[i + 1].role != "tool":
                out.special(IM_END)
                out.text("\n")

    if continue_final_message:
        # The final assistant turn always ends with <|im_end|> and "\n": drop both to leave it open.
        del out.parts[-2:]
    if add_generation_prompt:
        out.special(IM_START)
        out.text("assistant\n")
        if flavor is Flavor.QWEN3 and enable_thinking is False:
            out.special(THINK_START)
            out.text("\n\n")
            out.special(THINK_END)
            out.text("\n\n")
    thinking = not continue_final_message and resolve_thinking(messages, enable_thinking, flavor)
    return RenderedPrompt(parts=tuple(out.parts), thinking=thinking)


__all__ = ["MARKUP_TOKENS", "RenderedPrompt", "render", "resolve_thinking", "soft_switch", "split_reasoning"]
