"""Pieces shared by the Hermes-JSON families (Qwen2.5, Qwen3, Qwen3-2507, QwQ): the tools system turn and
the <tool_call> JSON form of a call."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from qwenkit.chat.families.base import Builder, message_content, tool_results
from qwenkit.chat.messages import Message, Tool, ToolCall
from qwenkit.tokenizer.specials import IM_END, IM_START

TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    f"<args-json-object>}}\n</tool_call>{IM_END}\n"
)
# Detector features: every Hermes template spells out this call shape.
HERMES_MARK = "<args-json-object>"


def tools_turn(out: Builder, system: str | None, tools: Sequence[Tool]) -> None:
    """The system turn that lists the tools; system (when not None) comes first, then a blank line."""
    out.markup(f"{IM_START}system\n")
    if system is not None:
        out.text(system)
        out.text("\n\n")
    out.markup(TOOLS_HEAD)
    for tool in tools:
        out.text("\n" + tool.to_json())
    out.markup(TOOLS_TAIL)


def turns(out: Builder, messages: Sequence[Message], assistant: Callable[[int, Message], None]) -> None:
    """Every message after the system prompt: a later system message and user messages as plain turns,
    assistant messages through the family's own `assistant(index, message)`, tool results grouped."""
    for i, m in enumerate(messages):
        if m.role == "system":
            if i > 0:
                plain_turn(out, "system", m.content or "")
        elif m.role == "user":
            out.markup(f"{IM_START}user\n")
            message_content(out, m)
            out.end_turn()
        elif m.role == "assistant":
            assistant(i, m)
        else:
            tool_results(out, messages, i, open_first=True, sep="\n")


def plain_turn(out: Builder, role: str, content: str) -> None:
    out.markup(f"{IM_START}{role}\n")
    out.text(content)
    out.end_turn()


def call(out: Builder, tool_call: ToolCall) -> None:
    """One call: arguments as given (a string verbatim, an object as JSON)."""
    out.markup('<tool_call>\n{"name": "')
    out.text(tool_call.name)
    out.text('", "arguments": ')
    out.text(tool_call.arguments_json())
    out.markup("}\n</tool_call>")


def opens_think(template: str) -> bool:
    """Whether the template's generation prompt opens a think block unconditionally (QwQ, 2507 Thinking)."""
    return "assistant\\n<think>\\n'" in template
