"""Prompt parts: what a renderer hands the tokenizer.

A prompt is a sequence of parts: plain text runs (str), always tokenized with added-token matching off, and
Special markers, each one added token that only trusted markup (the renderer) may emit. This is the
special-token injection guard: user, tool and document text can never become special ids.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Special:
    token: str

    def __str__(self) -> str:
        return self.token


Part = str | Special


def join_parts(parts: tuple[Part, ...] | list[Part]) -> str:
    """The prompt string the parts spell out."""
    return "".join(str(p) for p in parts)
