"""Benchmark prompts: plain words of about n tokens, the same for a given seed, none sharing a prefix.

Sized with a Qwen tokenizer (the built-in one when no other is given): the Qwen2/2.5/3 families share it, and
for other servers the count is an estimate; the server's own `usage.prompt_tokens` is reported beside it.
"""

from __future__ import annotations

import functools
import random

from qwenkit.tokenizer.tokenizer import QwenTokenizer

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
]


class TextMaker:
    """Plain-word text of about n tokens of this tokenizer, the same for a given seed."""

    def __init__(self, tokenizer: QwenTokenizer | None = None) -> None:
        tokenizer = tokenizer or QwenTokenizer.builtin()
        sample = self.words(random.Random(0), 400)
        self.tokens_per_word = len(tokenizer.encode_text(sample)) / 400

    @staticmethod
    def words(rng: random.Random, n: int) -> str:
        return " ".join(rng.choice(WORDS) + str(rng.randrange(1000)) for _ in range(n))

    def __call__(self, seed: str, n_tokens: int) -> str:
        return self.words(random.Random(seed), max(1, round(n_tokens / self.tokens_per_word)))


@functools.cache
def builtin_text_maker() -> TextMaker:
    """A TextMaker sized with the built-in Qwen tokenizer, built once per process (~1 s)."""
    return TextMaker()
