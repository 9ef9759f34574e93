"""Qwen3-2507 Instruct (Qwen3-235B-A22B / 30B-A3B / 4B-Instruct-2507): Qwen3's layout and Hermes tool calls
with thinking removed: no enable_thinking, no soft switches, a plain generation prompt; history is rendered
as Qwen3 renders it. Detected by the Hermes call shape with Qwen3's history handling (last_query_index)
but no enable_thinking. No official file is at hand: written from the published template, and tested
equal to the Qwen3 template where the two are the same (thinking left on).
"""

from __future__ import annotations

from collections.abc import Sequence

from qwenkit.chat.families import _hermes
from qwenkit.chat.families.qwen3 import Qwen3Hybrid
from qwenkit.chat.messages import Message


class Qwen3Instruct2507(Qwen3Hybrid):
    name = "qwen3_instruct_2507"
    title = "Qwen3-2507 Instruct (no thinking)"
    thinks = False
    soft_switches = False

    def detect(self, template: str) -> bool:
        return (
            _hermes.HERMES_MARK in template
            and "last_query_index" in template
            and "enable_thinking" not in template
            and not _hermes.opens_think(template)
        )

    def resolve_thinking(self, messages: Sequence[Message], enable_thinking: bool | None) -> bool:
        return False

    def _generation_prompt(self, out: _hermes.Builder, thinking: bool, enable_thinking: bool | None) -> bool:
        out.markup("<|im_start|>assistant\n")
        return False


FAMILY = Qwen3Instruct2507()
