"""Qwen3 hybrid thinking (official: Qwen3-0.6B; all April 2025 Qwen3 dense and MoE models): Hermes JSON tool
calls; thinking on unless enable_thinking=False (then the prompt holds an empty think block) or the latest
/no_think soft switch; the model writes <think>...</think> itself. Reasoning in history is kept only for
assistant turns after the latest real user query. Detected by the Hermes call shape plus enable_thinking.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from qwenkit.chat.families import _hermes
from qwenkit.chat.families.base import Builder, ChatFamily, last_query_index, split_reasoning
from qwenkit.chat.messages import Message, Tool
from qwenkit.tokenizer.specials import IM_START

# A switch is a whole word: not part of a path ("a/think") or a longer word ("/thinking").
_SOFT_SWITCH = re.compile(r"(?<![\w/])/(think|no_think)(?!\w)")


def soft_switch(text: str) -> bool | None:
    """The last /think (True) or /no_think (False) switch in text, or None when there is none."""
    found = _SOFT_SWITCH.findall(text)
    return None if not found else found[-1] == "think"


class Qwen3Hybrid(ChatFamily):
    name = "qwen3"
    title = "Qwen3 hybrid thinking"
    tool_format = "hermes"
    thinks = True
    soft_switches = True

    def detect(self, template: str) -> bool:
        return (
            _hermes.HERMES_MARK in template
            and "<think>" in template
            and "enable_thinking" in template
            and not _hermes.opens_think(template)
        )

    def resolve_thinking(self, messages: Sequence[Message], enable_thinking: bool | None) -> bool:
        """enable_thinking, else the latest system/user soft switch, else on."""
        if enable_thinking is not None:
            return enable_thinking
        for message in reversed(messages):
            if message.role in ("system", "user") and message.content:
                switch = soft_switch(message.content)
                if switch is not None:
                    return switch
        return True

    def _body(
        self, out: Builder, messages: Sequence[Message], tools: list[Tool], *, preserve_thinking: bool | None
    ) -> None:
        system = messages[0].content or "" if messages[0].role == "system" else None
        if tools:
            _hermes.tools_turn(out, system, tools)
        elif system is not None:
            _hermes.plain_turn(out, "system", system)
        # Without a real user query the index stays at the last message, so no turn is "after" it.
        query = last_query_index(messages)
        query = len(messages) - 1 if query is None else query
        last = len(messages) - 1
        _hermes.turns(
            out, messages, lambda i, m: self._assistant(out, m, think_tags=i > query, is_last=i == last)
        )

    def _assistant(self, out: Builder, message: Message, *, think_tags: bool, is_last: bool) -> None:
        reasoning, content = split_reasoning(message)
        out.markup(f"{IM_START}assistant\n")
        if think_tags and (is_last or reasoning):
            out.markup("<think>\n")
            out.text(reasoning.strip("\n"))
            out.markup("\n</think>\n\n")
            out.text(content.lstrip("\n"))
        else:
            out.text(content)
        for j, tool_call in enumerate(message.tool_calls):
            # The newline test uses the content before lstrip, as the official template does.
            if j > 0 or content:
                out.text("\n")
            _hermes.call(out, tool_call)
        out.end_turn()

    def _generation_prompt(self, out: Builder, thinking: bool, enable_thinking: bool | None) -> bool:
        out.markup(f"{IM_START}assistant\n")
        if enable_thinking is False:
            out.markup("<think>\n\n</think>\n\n")
        return False


FAMILY = Qwen3Hybrid()
