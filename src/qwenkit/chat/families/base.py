"""What every chat-template family shares: the prompt builder, the rendered prompt, and the ChatFamily base.

Contract: ChatFamily.render(messages, tools, ...) returns a RenderedPrompt whose text equals the family's
official Jinja template and whose parts mark every added token the family's own markup emits as Special;
message, tool and document text is always a plain str part, so it can never become special ids. A request
the template refuses (its raise_exception rules, e.g. Qwen3.5's "system message first") raises
ChatInputError naming the rule. Each family also states its output conventions: tool_format ("hermes" JSON
or Qwen3-Coder "xml" inside <tool_call>), whether its models write think blocks, and whether the prompt
opens the think block itself (then the output holds only </think>). detect(template) says whether a chat
template text is this family's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from qwenkit.chat.messages import ChatInputError, Message, Tool, ToolCall
from qwenkit.chat.parse import OutputParser
from qwenkit.tokenizer.parts import Part, Special, join_parts
from qwenkit.tokenizer.specials import (
    IM_END,
    IM_START,
    IMAGE_PAD,
    THINK_END,
    THINK_START,
    TOOL_CALL_END,
    TOOL_CALL_START,
    TOOL_RESPONSE_END,
    TOOL_RESPONSE_START,
    VISION_END,
    VISION_START,
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
        VISION_START,
        IMAGE_PAD,
        VISION_END,
    }
)
# How every Qwen VL template writes one image in a message (Qwen2.5-VL, Qwen3-VL, Qwen3.5).
IMAGE_MARKUP = f"{VISION_START}{IMAGE_PAD}{VISION_END}"
_MARKUP_RE = re.compile(
    "(" + "|".join(re.escape(t) for t in sorted(MARKUP_TOKENS, key=len, reverse=True)) + ")"
)

ToolFormat = Literal["hermes", "xml"]


@dataclass(frozen=True, slots=True)
class RenderedPrompt:
    """A rendered prompt: parts (text runs and Special markers), the thinking mode in force, whether the
    prompt ends inside a think block it opened, and the family that rendered it."""

    parts: tuple[Part, ...]
    thinking: bool
    think_opened: bool = False
    family: str = ""

    @property
    def text(self) -> str:
        """The prompt string (what the Jinja template produces)."""
        return join_parts(self.parts)

    def assistant_spans(self) -> tuple[tuple[int, int], ...]:
        """Character spans of each assistant turn's own text: from after its `<|im_start|>assistant\\n`
        header through its closing <|im_end|>. Found from the Special markers, so caller text that merely
        spells "<|im_start|>assistant" (a plain str part) never opens a span."""
        spans: list[tuple[int, int]] = []
        pos, start, after_open = 0, None, False
        for part in self.parts:
            if isinstance(part, Special):
                if part.token == IM_END and start is not None:
                    spans.append((start, pos + len(part.token)))
                    start = None
                after_open = part.token == IM_START
            else:
                if after_open and part.startswith("assistant"):
                    start = pos + len("assistant") + int(part[len("assistant") :].startswith("\n"))
                after_open = False
            pos += len(str(part))
        return tuple(spans)


class Builder:
    """Collects prompt parts: markup() for the template's own text, text() for anything a caller gave."""

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

    def markup(self, s: str) -> None:
        """Trusted template text: each markup token in it becomes a Special marker."""
        for i, piece in enumerate(_MARKUP_RE.split(s)):
            if i % 2:
                self.special(piece)
            else:
                self.text(piece)

    def end_turn(self) -> None:
        self.special(IM_END)
        self.text("\n")


def message_content(out: Builder, message: Message, *, strip: bool = False) -> None:
    """A user or tool message's content: its text, or its text runs and images in order (each image as
    IMAGE_MARKUP). strip: the template trims the rendered content (Qwen3.5's `render_content(...)|trim`)."""
    if message.parts is None:
        text = message.content or ""
        out.text(text.strip() if strip else text)
        return
    pieces = list(message.parts)
    if strip:  # trim the rendered whole: only text at either end can lose whitespace
        for end in (0, -1):
            while pieces and isinstance(pieces[end], str):
                trimmed = pieces[end].lstrip() if end == 0 else pieces[end].rstrip()  # type: ignore[union-attr]
                if trimmed:
                    pieces[end] = trimmed
                    break
                pieces.pop(end)
    for piece in pieces:
        if isinstance(piece, str):
            out.text(piece)
        else:
            out.markup(IMAGE_MARKUP)


def split_reasoning(message: Message) -> tuple[str, str]:
    """(reasoning, content) of an assistant message: reasoning_content, else inline <think>...</think>.

    Inline: reasoning is what precedes the first </think> (after any <think>), content what follows the last.
    """
    content = message.content or ""
    if message.reasoning_content is not None:
        return message.reasoning_content, content
    if THINK_END not in content:
        return "", content
    pieces = content.split(THINK_END)
    reasoning = pieces[0].rstrip("\n").split(THINK_START)[-1].lstrip("\n")
    return reasoning, pieces[-1].lstrip("\n")


def is_tool_response_wrapper(text: str) -> bool:
    return text.startswith(TOOL_RESPONSE_START) and text.endswith(TOOL_RESPONSE_END)


def last_query_index(messages: Sequence[Message], *, strip: bool = False) -> int | None:
    """Index of the latest real user query (not a <tool_response> wrapper), None when there is none."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        text = m.content or ""
        if m.role == "user" and not is_tool_response_wrapper(text.strip() if strip else text):
            return i
    return None


def jinja_str(value: Any) -> str:
    """A value as Jinja's `string` filter (and `~`) prints it: Python's str()."""
    return value if isinstance(value, str) else str(value)


def tojson(value: Any) -> str:
    """transformers' tojson filter: json.dumps without ASCII escaping, default separators."""
    return json.dumps(value, ensure_ascii=False)


def arguments_object(call: ToolCall, where: str) -> dict[str, Any]:
    """Tool-call arguments as an object, for templates that iterate them (JSON strings are decoded)."""
    if isinstance(call.arguments, dict):
        return call.arguments
    try:
        value = json.loads(call.arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ChatInputError(
            f"{where}: this model's template needs tool-call arguments as a JSON object, "
            f"got {call.arguments[:60]!r}"
        )
    return value


def refuse(rule: str, where: str | None = None) -> ChatInputError:
    """The error for a request the chat template refuses (its own raise_exception rule)."""
    prefix = f"{where}: " if where else ""
    return ChatInputError(f"{prefix}the model's chat template refuses this request: {rule}")


class ChatFamily:
    """One chat-template family. Subclasses set the class attributes and implement _body and detect."""

    name: str = ""
    title: str = ""
    tool_format: ToolFormat = "hermes"
    thinks: bool = False  # its models write think blocks (whatever the mode in force)
    soft_switches: bool = False  # /think and /no_think in system/user text switch thinking
    reasoning_in_prompt: bool = False  # the generation prompt opens <think> when thinking

    def __repr__(self) -> str:
        return f"<chat family {self.name}>"

    def detect(self, template: str) -> bool:
        """Whether a chat template text is this family's (features only; see families.choose_family)."""
        raise NotImplementedError

    def resolve_thinking(self, messages: Sequence[Message], enable_thinking: bool | None) -> bool:
        """The thinking mode in force for this request."""
        if not self.thinks:
            return False
        return enable_thinking is not False

    def think_block(self, continued: bool) -> bool:
        """Whether this turn's output may open with a think block, to be split off whatever the mode."""
        return self.thinks and not continued

    def output_parser(
        self,
        *,
        think_opened: bool,
        continued: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        call_names: Collection[str] | None = None,
    ) -> OutputParser:
        """The parser for the output after a prompt; think_opened: the prompt (or the caller) opened <think>,
        so the output starts inside the block."""
        return OutputParser(
            thinking=think_opened or self.think_block(continued),
            think_opened=think_opened,
            tools=tools,
            call_names=call_names,
        )

    def render(
        self,
        messages: Sequence[Message],
        tools: Sequence[Tool] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        enable_thinking: bool | None = None,
        preserve_thinking: bool | None = None,
        reasoning_effort: str | None = None,
    ) -> RenderedPrompt:
        """Render messages (and tool definitions) as this family's official template does.

        reasoning_effort is a template variable no family's official template reads (choose_family hands a
        template that reads it to JinjaTemplate), so the families ignore it.
        """
        check_inputs(messages, tools)
        if continue_final_message:
            check_continuable(messages, add_generation_prompt)
        out = Builder()
        self._body(out, messages, list(tools or ()), preserve_thinking=preserve_thinking)
        if continue_final_message:
            # The final assistant turn always ends with <|im_end|> and "\n": drop both to leave it open.
            del out.parts[-2:]
        thinking = not continue_final_message and self.resolve_thinking(messages, enable_thinking)
        opened = False
        if add_generation_prompt:
            opened = self._generation_prompt(out, thinking, enable_thinking)
        return RenderedPrompt(
            parts=tuple(out.parts), thinking=thinking, think_opened=opened, family=self.name
        )

    def _body(
        self, out: Builder, messages: Sequence[Message], tools: list[Tool], *, preserve_thinking: bool | None
    ) -> None:
        raise NotImplementedError

    def _generation_prompt(self, out: Builder, thinking: bool, enable_thinking: bool | None) -> bool:
        """Write the generation prompt; True when it leaves a think block open."""
        out.markup(f"{IM_START}assistant\n")
        return False


def check_inputs(messages: Sequence[Message], tools: Sequence[Tool] | None) -> None:
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


def check_continuable(messages: Sequence[Message], add_generation_prompt: bool) -> None:
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


def tool_results(out: Builder, messages: Sequence[Message], i: int, *, open_first: bool, sep: str) -> None:
    """One tool result; a run of them shares one user turn (Qwen2.5/Qwen3/QwQ/Qwen3.5 layout).

    open_first: a tool message with no message before it still opens the user turn.
    """
    m = messages[i]
    starts = messages[i - 1].role != "tool" if i > 0 else open_first
    if starts:
        out.markup(f"{IM_START}user")
    out.markup(f"{sep}{TOOL_RESPONSE_START}\n")
    message_content(out, m)
    out.markup(f"\n{TOOL_RESPONSE_END}")
    if i == len(messages) - 1 or messages[i + 1].role != "tool":
        out.end_turn()


def get(mapping: Mapping[str, Any], key: str) -> Any:
    return mapping.get(key) if isinstance(mapping, Mapping) else None
