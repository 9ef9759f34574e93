"""Qwen3-Coder (official: Qwen3-Coder-480B-A35B / 30B-A3B-Instruct): no thinking; tools described in an XML
outline and called in the XML form `<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n
</function>\n</tool_call>`; a default system message only when tools are given; reasoning in history is
not rendered. Detected by `<function=` with no think block anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qwenkit.chat.families import _xml
from qwenkit.chat.families.base import Builder, ChatFamily, jinja_str, message_content, tojson
from qwenkit.chat.messages import Message, Tool
from qwenkit.tokenizer.specials import IM_START

DEFAULT_SYSTEM = "You are Qwen, a helpful AI assistant that can interact with a computer to solve tasks."
_INSTRUCTIONS = (
    "\n\nIf you choose to call a tool ONLY reply in the following format with NO suffix:\n\n<tool_call>\n"
    "<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nvalue_2\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\n"
    "Reminder:\n- Function calls MUST follow the specified format: the tool calling block MUST begin with an "
    "opening <tool_call> tag and end with a closing </tool_call> tag.\n- Required parameters MUST be "
    "specified\n- You may provide optional reasoning for your function call in natural language BEFORE the "
    "function call, but NOT after\n- If there is no function call available, answer the question like "
    "normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>"
)


def _extra_keys(out: Builder, fields: Any, handled: tuple[str, ...]) -> None:
    """Keys the outline does not name, each as <key>value</key> (objects and lists as JSON)."""
    if not isinstance(fields, Mapping):
        return
    for key, value in fields.items():
        if key in handled:
            continue
        shown = tojson(value) if isinstance(value, Mapping | list | tuple) else jinja_str(value)
        out.text(f"\n<{key}>{shown}</{key}>")


def _tools_outline(out: Builder, tools: Sequence[Tool]) -> None:
    out.text("\n\n# Tools\n\nYou have access to the following tools:\n\n<tools>")
    for tool in tools:
        fn: dict[str, Any] = tool.root["function"]
        out.text(f"\n<function>\n<name>{jinja_str(fn['name'])}</name>")
        if "description" in fn:
            out.text(f"\n<description>{jinja_str(fn['description']).strip()}</description>")
        out.text("\n<parameters>")
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, Mapping) else None
        if isinstance(props, Mapping):
            for name, fields in props.items():
                out.text(f"\n<parameter>\n<name>{name}</name>")
                if isinstance(fields, Mapping) and "type" in fields:
                    out.text(f"\n<type>{jinja_str(fields['type'])}</type>")
                if isinstance(fields, Mapping) and "description" in fields:
                    out.text(f"\n<description>{jinja_str(fields['description']).strip()}</description>")
                _extra_keys(out, fields, ("name", "type", "description"))
                out.text("\n</parameter>")
        _extra_keys(out, params, ("type", "properties"))
        out.text("\n</parameters>")
        _extra_keys(out, fn, ("type", "name", "description", "parameters"))
        out.text("\n</function>")
    out.text("\n</tools>")
    out.markup(_INSTRUCTIONS)


class Qwen3Coder(ChatFamily):
    name = "qwen3_coder"
    title = "Qwen3-Coder (XML tool calls, no thinking)"
    tool_format = "xml"
    thinks = False

    def detect(self, template: str) -> bool:
        return _xml.XML_MARK in template and "<think>" not in template

    def _body(
        self, out: Builder, messages: Sequence[Message], tools: list[Tool], *, preserve_thinking: bool | None
    ) -> None:
        rest: Sequence[Message] = messages
        if messages[0].role == "system":
            out.markup(f"{IM_START}system\n")
            out.text(messages[0].content or "")
            rest = messages[1:]
        elif tools:
            out.markup(f"{IM_START}system\n")
            out.text(DEFAULT_SYSTEM)
        if tools:
            _tools_outline(out, tools)
        if messages[0].role == "system" or tools:
            out.end_turn()
        for i, m in enumerate(rest):
            where = f"messages[{i + len(messages) - len(rest)}]"
            if m.role == "assistant" and m.tool_calls:
                out.markup(f"{IM_START}assistant")
                if m.content and m.content.strip():
                    out.text("\n" + m.content.strip() + "\n")
                for j, tool_call in enumerate(m.tool_calls):
                    out.text("\n")
                    _xml.call(out, tool_call, f"{where}.tool_calls[{j}]")
                out.end_turn()
            elif m.role == "tool":
                if i > 0 and rest[i - 1].role != "tool":
                    out.markup(f"{IM_START}user\n")
                out.markup("<tool_response>\n")
                message_content(out, m)
                out.markup("\n</tool_response>\n")
                if i == len(rest) - 1 or rest[i + 1].role != "tool":
                    out.end_turn()
            else:
                out.markup(f"{IM_START}{m.role}\n")
                message_content(out, m)
                out.end_turn()


FAMILY = Qwen3Coder()
