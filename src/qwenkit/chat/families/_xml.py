"""Pieces shared by the XML tool-call families (Qwen3-Coder, Qwen3.5+): the <function=...> form of a call."""

from __future__ import annotations

from collections.abc import Mapping

from qwenkit.chat.families.base import Builder, arguments_object, jinja_str, tojson
from qwenkit.chat.messages import ToolCall

# Detector feature: every XML-call template shows this opening.
XML_MARK = "<function="


def call(out: Builder, tool_call: ToolCall, where: str) -> None:
    """`<tool_call>\\n<function=NAME>\\n` + one <parameter=KEY> block per argument + the closing tags."""
    out.markup("<tool_call>\n<function=")
    out.text(tool_call.name + ">\n")
    for key, value in arguments_object(tool_call, f"{where}.function.arguments").items():
        # Objects and lists as JSON, anything else as Jinja's `string` filter prints it.
        shown = tojson(value) if isinstance(value, Mapping | list | tuple) else jinja_str(value)
        out.text(f"<parameter={key}>\n{shown}\n</parameter>\n")
    out.markup("</function>\n</tool_call>")
