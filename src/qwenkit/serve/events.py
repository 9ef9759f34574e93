"""Native engine events, read the same way by every API: how a request finished, and tool-call fragments
joined per call.

Contract: finish_reason() maps an engine's finish to "stop" / "length" / "tool_calls" and raises APIError
for an abort (503 while the server drains) or an engine failure; merged_fragments() joins a parser delta's
consecutive fragments of one call, so each API sends one piece per call per event.
"""

from __future__ import annotations

from qwenkit.chat.parse import ToolCallDelta
from qwenkit.engines.request import TokenEvent
from qwenkit.serve.errors import APIError, shutting_down


def finish_reason(event: TokenEvent, draining: bool, made_calls: bool) -> str:
    """The finish_reason (OpenAI's words, which other APIs map) for an engine's; errors and aborts become
    APIErrors (an abort while draining is the 503 of a shutdown)."""
    if event.finish_reason == "length":
        return "length"
    if event.finish_reason == "stop":
        return "tool_calls" if made_calls else "stop"
    if event.finish_reason == "abort":
        raise shutting_down() if draining else APIError(500, "the request was aborted", code="aborted")
    raise APIError(500, f"generation failed: {event.error or 'engine error'}", code="engine_error")


def merged_fragments(fragments: list[ToolCallDelta]) -> list[tuple[int, str | None, str | None, str]]:
    """(index, id, name, arguments), a call's consecutive fragments joined: one entry per call per chunk."""
    merged: list[tuple[int, str | None, str | None, str]] = []
    for f in fragments:
        if merged and merged[-1][0] == f.index:
            index, id_, name, arguments = merged[-1]
            merged[-1] = (index, id_, name, arguments + f.arguments)
        else:
            merged.append((f.index, f.id, f.name, f.arguments))
    return merged
