"""The internal request type every engine takes and the events it streams back.

Contract: a GenerationRequest is token ids in (never text, never chat messages) plus how to sample and
when to stop; an engine answers with TokenEvents, the last one carrying finish_reason. The server and the
CLI translate to and from this type; engines (llama.cpp today, transformers or vLLM later) only implement it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from qwenkit.engines.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort", "error"]

# Qwen's own text for ending thinking early: the model was trained to answer after it.
THINKING_EARLY_STOP = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
    "directly now.\n</think>\n\n"
)


class EngineError(ValueError):
    """A request the engine cannot run; the message is one line naming the fix."""


class RequestTooLong(EngineError):
    pass


class EngineOverloaded(EngineError):
    """Too many requests waiting, or the engine is shutting down; retry later (HTTP 503)."""


class GrammarError(EngineError):
    pass


@dataclass(frozen=True, slots=True)
class Grammar:
    """Constrained decoding: a GBNF grammar (llama.cpp's format) and, when it came from one, the JSON
    schema (for engines that take schemas). after_think: constrain only the answer after </think>."""

    gbnf: str
    root: str = "root"
    after_think: bool = True
    json_schema: str | None = None


@dataclass(frozen=True, slots=True)
class ThinkingControl:
    """Reasoning tracking: starts_inside when the prompt already opened <think>; budget caps its tokens."""

    starts_inside: bool = False
    budget: int | None = None


@dataclass(frozen=True, slots=True, eq=False)
class ImageInput:
    """One decoded image of a prompt: RGB pixels, shape (height, width, 3), uint8, and the sha256 of those
    pixels (what prefix reuse keys on, so the same picture matches whatever its encoding)."""

    pixels: np.ndarray
    sha256: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()  # end the request (the token is counted, not in the text)
    ignore_eos: bool = False  # end-of-generation tokens do not end it; stop_token_ids still do
    grammar: Grammar | None = None
    thinking: ThinkingControl | None = None
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the top k
    # Each image's place in prompt_token_ids is one image-pad token (the model's <|image_pad|>), in order.
    images: tuple[ImageInput, ...] = ()
    # The LoRA adapter (a name the engine loaded at start) to run with; None: the base model alone.
    adapter: str | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class TokenEvent:
    """New tokens of one request and their text (stop strings already cut, partial UTF-8 held back)."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens not prefilled: a cached prefix or a restored saved state held them
    reasoning_tokens: int = 0  # generated tokens inside <think>…</think> so far (when thinking is tracked)
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class EngineStats:
    running: int
    waiting: int
    kv_used: int
    kv_total: int
    steps: int
    preemptions: int
    # Saved sequence states (multi-turn snapshots, spilled prefix caches): engines without one report 0.
    state_cache_bytes: int = 0
    state_cache_entries: int = 0
    state_cache_hits: int = 0
    state_cache_evictions: int = 0
    image_encodes: int = 0  # vision-tower runs (images not served from a cached prefix); 0 without --mmproj
    threads: int = (
        0  # CPU threads decoding now (they follow other load with adapt_threads); 0: not a CPU engine
    )
