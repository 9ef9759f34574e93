"""Qwen3.5 and later (official: Qwen3.5-4B; Qwen3.5 / 3.6 / 3.8, dense and MoE): the prompt opens the think
block (`<think>\n`; enable_thinking=False writes an empty closed one instead), so the output holds only
`</think>`; Qwen3-Coder XML tool calls with the tools listed as JSON; no soft switches; message text is
trimmed; every assistant turn after the latest user query keeps its reasoning (preserve_thinking=True, from
Qwen3.6, keeps it in every turn). The template refuses a system message that is not first, a conversation
without a user query, and any other role: those raise ChatInputError naming the rule. Detected by
`<function=` together with a think block.
"""

from __future__ import annotations

from collections.abc import Sequence

from qwenkit.chat.families import _xml
from qwenkit.chat.families.base import (
    Builder,
    ChatFamily,
    last_query_index,
    message_content,
    refuse,
    split_reasoning,
)
from qwenkit.chat.messages import Message, Tool
from qwenkit.tokenizer.specials import IM_START, THINK_END

_TOOLS_HEAD = f"{IM_START}system\n# Tools\n\nYou have access to the following functions:\n\n<tools>"
_INSTRUCTIONS = (
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple "
    "lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow "
    "the specified format: an inner <function=...></function> block must be nested within "
    "<tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional "
    "reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If "
    "there is no function call available, answer the question like normal with your current knowledge and "
    "do not tell the user about function calls\n</IMPORTANT>"
)


class Qwen35(ChatFamily):
    name = "qwen3_5"
    title = "Qwen3.5+ (think opened in the prompt, XML tool calls)"
    tool_format = "xml"
    thinks = True
    reasoning_in_prompt = True

    def detect(self, template: str) -> bool:
        return _xml.XML_MARK in template and "<think>" in template

    def _body(
        self, out: Builder, messages: Sequence[Message], tools: list[Tool], *, preserve_thinking: bool | None
    ) -> None:
        system = (messages[0].content or "").strip() if messages[0].role == "system" else None
        if tools:
            out.markup(_TOOLS_HEAD)
            for tool in tools:
                out.text("\n" + tool.to_json())
            out.markup(_INSTRUCTIONS)
            if system:
                out.text("\n\n" + system)
            out.end_turn()
        elif system is not None:
            out.markup(f"{IM_START}system\n")
            out.text(system)
            out.end_turn()
        query = last_query_index(messages, strip=True)
        if query is None:
            raise refuse("No user query found in messages.", "messages")
        for i, m in enumerate(messages):
            if m.role == "system":
                if i > 0:
                    raise refuse("System message must be at the beginning.", f"messages[{i}]")
            elif m.role == "user":
                out.markup(f"{IM_START}user\n")
                message_content(out, m, strip=True)
                out.end_turn()
            elif m.role == "assistant":
                self._assistant(out, m, i, think=bool(preserve_thinking) or i > query)
            else:
                if i > 0 and messages[i - 1].role != "tool":
                    out.markup(f"{IM_START}user")
                out.markup("\n<tool_response>\n")
                message_content(out, m, strip=True)
                out.markup("\n</tool_response>")
                if i == len(messages) - 1 or messages[i + 1].role != "tool":
                    out.end_turn()

    def _assistant(self, out: Builder, m: Message, i: int, *, think: bool) -> None:
        text = (m.content or "").strip()
        if m.reasoning_content is not None:
            reasoning = m.reasoning_content
        elif THINK_END in text:
            reasoning, text = split_reasoning(m.model_copy(update={"content": text}))
        else:
            reasoning = ""
        out.markup(f"{IM_START}assistant\n")
        if think:
            out.markup("<think>\n")
            out.text(reasoning.strip())
            out.markup("\n</think>\n\n")
        out.text(text)
        for j, tool_call in enumerate(m.tool_calls):
            if j > 0:
                out.text("\n")
            elif text.strip():
                out.text("\n\n")
            _xml.call(out, tool_call, f"messages[{i}].tool_calls[{j}]")
        out.end_turn()

    def _generation_prompt(self, out: Builder, thinking: bool, enable_thinking: bool | None) -> bool:
        out.markup(f"{IM_START}assistant\n")
        if enable_thinking is False:
            out.markup("<think>\n\n</think>\n\n")
            return False
        out.markup("<think>\n")
        return True


FAMILY = Qwen35()
