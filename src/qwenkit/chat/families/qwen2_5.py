"""Qwen2 / Qwen2.5 instruct (official: Qwen2.5-7B-Instruct): a default system message when none is given,
Hermes JSON tool calls, no thinking (think tags in history are kept as text, as the template keeps them).
Detected by the Hermes call shape with no <think> handling at all."""

from __future__ import annotations

from collections.abc import Sequence

from qwenkit.chat.families import _hermes
from qwenkit.chat.families.base import Builder, ChatFamily
from qwenkit.chat.messages import Message, Tool
from qwenkit.tokenizer.specials import IM_START

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


class Qwen25(ChatFamily):
    name = "qwen2_5"
    title = "Qwen2.5 instruct"
    tool_format = "hermes"
    thinks = False

    def detect(self, template: str) -> bool:
        return _hermes.HERMES_MARK in template and "think>" not in template

    def _body(
        self, out: Builder, messages: Sequence[Message], tools: list[Tool], *, preserve_thinking: bool | None
    ) -> None:
        first = messages[0]
        system = first.content or "" if first.role == "system" else DEFAULT_SYSTEM
        if tools:
            _hermes.tools_turn(out, system, tools)
        else:
            _hermes.plain_turn(out, "system", system)

        def assistant(i: int, m: Message) -> None:
            out.markup(f"{IM_START}assistant")
            if m.content or not m.tool_calls:
                out.text("\n" + (m.content or ""))
            for tool_call in m.tool_calls:
                out.text("\n")
                _hermes.call(out, tool_call)
            out.end_turn()

        _hermes.turns(out, messages, assistant)


FAMILY = Qwen25()
