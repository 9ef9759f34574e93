"""The engine contract the server and CLI code against; llama.cpp today, transformers or vLLM later.

Contract: an Engine takes GenerationRequests (token ids in) and streams TokenEvents (token ids and their
text out); abort(request_id) ends a request within one step; stats() is cheap and thread-safe enough for
/health and /metrics; shutdown() stops admitting, lets running requests finish up to a timeout, then frees.
An EmbeddingEngine (an embedding model) is an Engine whose embed() pools token-id lists into vectors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from qwenkit.engines.request import EngineStats, GenerationRequest, TokenEvent


@runtime_checkable
class Engine(Protocol):
    n_ctx: int

    def start(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...


@runtime_checkable
class EmbeddingEngine(Engine, Protocol):
    """An engine for an embedding model: embed(token-id lists) → each input's pooled hidden state (n_embd
    float32 values, not normalised); n_ctx is the most tokens one input may hold. generate() refuses."""

    n_embd: int

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[np.ndarray]: ...
