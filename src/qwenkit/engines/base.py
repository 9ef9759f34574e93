"""The engine contract the server and CLI code against; llama.cpp today, transformers or vLLM later.

Contract: an Engine takes GenerationRequests (token ids in) and streams TokenEvents (token ids and their
text out); abort(request_id) ends a request within one step; stats() is cheap and thread-safe enough for
/health and /metrics; shutdown() stops admitting, lets running requests finish up to a timeout, then frees.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from qwenkit.engines.request import EngineStats, GenerationRequest, TokenEvent


@runtime_checkable
class Engine(Protocol):
    n_ctx: int

    def start(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]: ...

    def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...
