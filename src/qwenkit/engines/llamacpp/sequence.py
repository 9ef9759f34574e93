"""One request's life inside the engine: its tokens, where they stand in the KV cache, its text so far.

Contract: tokens = prompt + everything generated or inserted; the first n_cached of them are in the KV
cache under seq_id. What is left to feed is tokens[n_cached:] (a prompt chunk, forced tokens, or the one
token sampled last step). snapshot_at, when set, is a prompt position where a prompt chunk must end so
the engine can save the state there. The sequence never touches llama.cpp itself.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from qwenkit.engines.detok import IncrementalText, StopMatcher
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

    def __post_init__(self) -> None:
        self.tokens = list(self.request.prompt_token_ids)
        sampling = self.request.sampling
        self.stops = StopMatcher(sampling.stop, include_stop=sampling.include_stop_str_in_output)
        thinking = self.request.thinking
        self.in_reasoning = bool(thinking and thinking.starts_inside)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def n_prompt(self) -> int:
        return len(self.request.prompt_token_ids)

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
