"""Incremental detokenization and stop strings, shared by every engine.

Contract: IncrementalText turns token byte pieces into text without ever splitting a UTF-8 character;
StopMatcher holds back only text that could still become a stop string and cuts at the first match
(keeping the matched stop string itself when include_stop is set).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class IncrementalText:
    """Token pieces (bytes) → text deltas; an incomplete UTF-8 sequence waits for its next bytes."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, piece: bytes) -> str:
        return self._decoder.decode(piece)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Text deltas → (text safe to emit, stopped). After a stop, the text past the match is dropped."""

    def __init__(self, stops: Sequence[str], include_stop: bool = False) -> None:
        self._stops = tuple(s for s in stops if s)
        self._include = include_stop
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        found = [(i, s) for s in self._stops if (i := buf.find(s)) >= 0]
        if found:
            cut, stop = min(found, key=lambda f: f[0])
            self.stopped = True
            self._held = ""
            return buf[: cut + len(stop)] if self._include else buf[:cut]
        keep = self._longest_stop_prefix_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, buf: str) -> int:
        # The longest tail of buf that is a proper prefix of some stop string must wait for more text.
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
