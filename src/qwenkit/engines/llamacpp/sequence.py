"""One request's life inside the engine: its tokens, where they stand in the KV cache, its text so far.

Contract: tokens = prompt + everything generated or inserted; the first n_cached of them are in the KV
cache under seq_id. What is left to feed is tokens[n_cached:] (a prompt chunk, forced tokens, or the one
token sampled last step). snapshot_at, when set, is a prompt position where a prompt chunk must end so
the engine can save the state there. With images, tokens holds each image as its image keys (see
image_tokens.py) and `images` its spans; n_prompt counts those tokens, and position(i) is where token i
sits (an image advances the position by its n_pos, not its token count). next_run() says how many of the
pending tokens one step may feed without crossing into or out of an image (0: the image is not encoded
yet). The sequence never touches llama.cpp itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from qwenkit.engines.detok import IncrementalText, StopMatcher
from qwenkit.engines.llamacpp.image_tokens import ImageSpan
from qwenkit.engines.request import FinishReason, GenerationRequest, TokenEvent, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    sink: Callable[[TokenEvent], None]
    max_new: int
    arrival: int
    tokens: list[int] = field(default_factory=list)
    seq_id: int = -1
    n_cached: int = 0
    n_generated: int = 0
    cached_prompt: int = 0
    snapshot_at: int = 0  # prompt position where the engine saves this sequence's state (0: nowhere)
    status: Status = Status.WAITING
    in_reasoning: bool = False
    reasoning_tokens: int = 0
    finish_reason: FinishReason | None = None
    text: IncrementalText = field(default_factory=IncrementalText)
    stops: StopMatcher = field(init=False)
    sampler: object | None = None  # SeqSampler, typed loosely to keep this file free of llama.cpp
    images: list[ImageSpan] = field(default_factory=list)
    n_prompt: int = field(init=False)

    def __post_init__(self) -> None:
        if not self.tokens:  # else the engine gave the prompt with its images expanded
            self.tokens = list(self.request.prompt_token_ids)
        self.n_prompt = len(self.tokens)
        sampling = self.request.sampling
        self.stops = StopMatcher(sampling.stop, include_stop=sampling.include_stop_str_in_output)
        thinking = self.request.thinking
        self.in_reasoning = bool(thinking and thinking.starts_inside)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def position(self, i: int) -> int:
        """The position of token i (an image's tokens all count from the image's first position)."""
        pos = i
        for span in self.images:
            if i < span.start:
                break
            if i < span.end:
                return pos - (i - span.start)
            pos += span.n_pos - span.n_tokens
        return pos

    def image_at(self, i: int) -> ImageSpan | None:
        for span in self.images:
            if span.start <= i < span.end:
                return span
        return None

    def next_run(self, limit: int) -> int:
        """How many pending tokens (at most limit) one step feeds: a text run stops where an image starts,
        an image run where it ends; 0 while the next image is not encoded."""
        i = self.n_cached
        for span in self.images:
            if i < span.start:
                return min(limit, span.start - i)
            if i < span.end:
                return 0 if span.embd is None else min(limit, span.end - i)
        return limit

    @property
    def pending(self) -> int:
        """Tokens not yet in the KV cache."""
        return len(self.tokens) - self.n_cached

    @property
    def decoding(self) -> bool:
        """Only the last sampled token is left to feed: a one-token decode step."""
        return self.pending == 1 and self.n_generated > 0 and self.n_cached >= self.n_prompt

    def emit(
        self,
        token_ids: list[int],
        text: str,
        finish: FinishReason | None = None,
        logprobs: list[TokenLogprob] | None = None,
        error: str | None = None,
    ) -> None:
        if finish is not None:
            self.finish_reason = finish
            self.status = Status.FINISHED
        self.sink(
            TokenEvent(
                request_id=self.request_id,
                token_ids=token_ids,
                text=text,
                finish_reason=finish,
                prompt_tokens=self.n_prompt,
                completion_tokens=self.n_generated,
                cached_tokens=self.cached_prompt,
                reasoning_tokens=self.reasoning_tokens,
                logprobs=logprobs,
                error=error,
            )
        )
