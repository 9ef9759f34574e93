"""Thinking-only models whose prompt opens the think block: Qwen3-2507 Thinking and QwQ-32B.

The generation prompt ends with `<think>\n`, so the output holds only the reasoning, `</think>`, then the
answer (the parser starts inside the block). Hermes JSON tool calls.
- Qwen3-2507 Thinking (235B-A22B / 30B-A3B / 4B-Thinking-2507): Qwen3's layout, always thinking (no
  enable_thinking, no soft switches). No official file is at hand: tested equal to the Qwen3 template plus
  the opened block. Detected by the opened block plus Qwen3's last_query_index.
- QwQ (official: QwQ-32B, as llama.cpp vendors it): Qwen2.5-style tools turn without a default system
  message; history answers lose their reasoning except in the last message; enable_thinking=False closes
  the block at once (`<think>\n</think>`). Detected by the opened block without last_query_index.
"""

from __future__ import annotations

from collections.abc import Sequence

from qwenkit.chat.families import _hermes
from qwenkit.chat.families.base import Builder, ChatFamily
from qwenkit.chat.families.qwen3 import Qwen3Hybrid
from qwenkit.chat.messages import Message, Tool
from qwenkit.tokenizer.specials import IM_START, THINK_END


class Qwen3Thinking2507(Qwen3Hybrid):
    name = "qwen3_thinking_2507"
    title = "Qwen3-2507 Thinking (think opened in the prompt)"
    thinks = True
    soft_switches = False
    reasoning_in_prompt = True

    def detect(self, template: str) -> bool:
        return (
            _hermes.HERMES_MARK in template
            and _hermes.opens_think(template)
            and "last_query_index" in template
        )

    def resolve_thinking(self, messages: Sequence[Message], enable_thinking: bool | None) -> bool:
        return True  # the template has no switch: these models always think

    def _generation_prompt(self, out: Builder, thinking: bool, enable_thinking: bool | None) -> bool:
        out.markup(f"{IM_START}assistant\n<think>\n")
        return True


class QwQ(ChatFamily):
    name = "qwq"
    title = "QwQ (think opened in the prompt)"
    tool_format = "hermes"
    thinks = True
    reasoning_in_prompt = True

    def detect(self, template: str) -> bool:
        return (
            _hermes.HERMES_MARK in template
            and _hermes.opens_think(template)
            and "last_query_index" not in template
        )

    def _body(
        self, out: Builder, messages: Sequence[Message], tools: list[Tool], *, preserve_thinking: bool | None
    ) -> None:
        first = messages[0]
        system = first.content or "" if first.role == "system" else None
        if tools:
            _hermes.tools_turn(out, system or "", tools)
        elif system is not None:
            _hermes.plain_turn(out, "system", system)
        last = len(messages) - 1

        def assistant(i: int, m: Message) -> None:
            content = m.content or ""
            if i != last:
                content = content.split(THINK_END)[-1].lstrip("\n")
            out.markup(f"{IM_START}assistant")
            if m.content or not m.tool_calls:
                out.text("\n" + content)
            for tool_call in m.tool_calls:
                out.text("\n")
                _hermes.call(out, tool_call)
            out.end_turn()

        _hermes.turns(out, messages, assistant)

    def _generation_prompt(self, out: Builder, thinking: bool, enable_thinking: bool | None) -> bool:
        out.markup(f"{IM_START}assistant\n<think>\n")
        if not thinking:
            out.markup(THINK_END)
        return thinking


QWEN3_THINKING_2507 = Qwen3Thinking2507()
QWQ = QwQ()
