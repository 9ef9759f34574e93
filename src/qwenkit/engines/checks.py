"""The checks every engine makes before it accepts a GenerationRequest, in one place.

Contract: each function raises EngineError (RequestTooLong for the context) with a one-line message
naming the fix, or returns quietly; check_room() returns the tokens left for the answer. wait_drained()
is the shutdown wait engines share: poll until nothing runs or the timeout passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from qwenkit.engines.request import EngineError, GenerationRequest, RequestTooLong


def check_prompt_ids(prompt: Sequence[int], n_vocab: int) -> None:
    if not prompt:
        raise EngineError("empty prompt: give at least one token")
    if min(prompt) < 0 or max(prompt) >= n_vocab:
        raise EngineError(f"prompt has token ids outside the vocabulary (0..{n_vocab - 1})")


def check_room(n_prompt: int, max_tokens: int | None, n_ctx: int) -> int:
    """The tokens one request may still generate; RequestTooLong when max_tokens does not fit."""
    room = n_ctx - n_prompt
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise RequestTooLong(
            f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens or 1}) exceeds the context "
            f"({n_ctx}); shorten the prompt, lower max_tokens or raise the context size"
        )
    return room


def check_sampling_ids(request: GenerationRequest, n_vocab: int, max_logprobs: int) -> None:
    """logprobs within the engine's limit, logit_bias token ids within the vocabulary."""
    if request.logprobs is not None and not 0 <= request.logprobs <= max_logprobs:
        raise EngineError(f"logprobs must be between 0 and {max_logprobs}")
    bad = [t for t in request.sampling.logit_bias if not 0 <= t < n_vocab]
    if bad:
        raise EngineError(f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")


def wait_drained(busy: Callable[[], bool], timeout: float, poll: float = 0.02) -> None:
    """Return once busy() is false or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while busy() and time.monotonic() < deadline:
        time.sleep(poll)


__all__ = ["check_prompt_ids", "check_room", "check_sampling_ids", "wait_drained"]
