"""Embeddings on llama.cpp: its own model and context (embeddings on, last-token pooling), never the
generation engine's.

Contract: LlamaEmbedder(gguf, config) loads the GGUF into a context with embeddings=True and pooling LAST,
config.threads threads and a unified KV pool of n_ctx = config.n_ctx // config.max_seqs cells (of
config.kv_type; flash attention as config.flash_attn; when None, off, except llama.cpp's auto for a q8_0
cache, which needs it): the most tokens one input, and one call, may hold.
embed(inputs) checks its inputs (empty, too long or out-of-vocabulary: EngineError/RequestTooLong for
that caller alone), then queues them. Concurrent callers are batched together: one thread at a time
decodes, for every caller queued when it starts, all their inputs in arrival order, in as few llama_decode
calls as fit (up to max_seqs sequences and n_ctx tokens per call, each its own seq id, the memory cleared
before each call; llama.cpp splits a call into ubatches of config.n_ubatch tokens, and causal attention
over the KV cache keeps a split sequence exact), and hands each caller its own vectors in order; a caller
that arrives while a batch runs waits for the next one. It returns each input's pooled hidden state (after
the final norm; not normalised: the caller truncates and normalises). A caller that gives up (a
disconnected HTTP request) costs the others nothing: its inputs are embedded and dropped. A failed
llama_decode fails every caller of that batch. It also satisfies the Engine protocol so the server runs it
like any engine: generate() raises EngineError, stats() reports callers being embedded (running) and
queued (waiting), and steps counts llama_decode calls (fewer than callers: batched across requests).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np

from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.model import TokenBatch, context_params, last_logged, load_model
from qwenkit.engines.request import EngineError, EngineStats, GenerationRequest, RequestTooLong, TokenEvent


@dataclass
class _Caller:
    """One embed() call waiting in the queue; the thread that decodes it fills vectors or error."""

    inputs: Sequence[Sequence[int]]
    vectors: list[np.ndarray] = field(default_factory=list)
    error: EngineError | None = None
    done: bool = False


class LlamaEmbedder:
    """A llama.cpp embedding context for one GGUF (see the module docstring)."""

    def __init__(self, gguf_path: Path, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self._model = load_model(gguf_path)
        # One call carries at most one input's worth of tokens (the memory is cleared between calls), so
        # the KV pool and llama.cpp's per-call output buffers are sized by that, not by config.n_ctx.
        self.n_ctx = config.n_ctx // config.max_seqs  # the most tokens one input may hold
        # Exact attention unless asked (or a q8_0 KV cache needs it): flash attention's f16 rounding moves
        # vectors by ~5e-5, and vectors are compared across systems (they match transformers to 1e-6 without).
        chosen = config.flash_attn is not None or config.kv_type == "q8_0"
        exact = config if chosen else config.model_copy(update={"flash_attn": False})
        cparams = context_params(exact, self.n_ctx, self.n_ctx)
        cparams.embeddings = True
        cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_LAST
        cparams.kv_unified = True  # inputs of any length share the cells
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise EngineError(
                f"llama.cpp could not create an embedding context of {self.n_ctx} tokens ({last_logged()})"
            )
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model)))
        self._batch = TokenBatch(self.n_ctx)
        self._cond = threading.Condition()  # guards the queue, the counters and _decoding
        self._decoding = False  # one thread decodes at a time, for every queued caller
        self._queue: list[_Caller] = []
        self._in_flight = 0
        self._running = 0
        self._calls = 0
        self._closed = False

    # ---- embedding --------------------------------------------------------------------------------
    def embed(self, inputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Each input's last-token hidden state (float32, n_embd values), in order; batched with the inputs
        of concurrent callers (see the module docstring)."""
        for i, tokens in enumerate(inputs):
            if not tokens:
                raise EngineError(f"input {i} is empty: give at least one token")
            if len(tokens) > self.n_ctx:
                raise RequestTooLong(
                    f"input {i} has {len(tokens)} tokens; at most {self.n_ctx} fit (raise --ctx or split it)"
                )
            if min(tokens) < 0 or max(tokens) >= self.n_vocab:
                raise EngineError(f"input {i} has token ids outside the vocabulary (0..{self.n_vocab - 1})")
        caller = _Caller(inputs)
        with self._cond:
            self._in_flight += 1
            self._queue.append(caller)
            # Wait until another thread's batch has embedded ours, or the decoder's seat is free.
            while not caller.done and self._decoding:
                self._cond.wait()
            decoder = not caller.done
            self._decoding = self._decoding or decoder
        try:
            if decoder:
                self._run_queue()
        finally:
            with self._cond:
                self._in_flight -= 1
                if decoder:
                    self._decoding = False
                    self._cond.notify_all()  # wakes the callers served, and the next decoder
        if caller.error is not None:
            raise caller.error
        return caller.vectors

    def _run_queue(self) -> None:
        """Embed every queued caller's inputs together (only the thread holding the decoder's seat)."""
        with self._cond:
            callers, self._queue = self._queue, []
            self._running = len(callers)
        try:
            if self._closed:
                raise EngineError("the embedding engine is shut down")
            flat = [tokens for caller in callers for tokens in caller.inputs]
            vectors: list[np.ndarray] = []
            for group in self._groups(flat):
                vectors += self._decode(group)
            for caller in callers:
                caller.vectors, vectors = vectors[: len(caller.inputs)], vectors[len(caller.inputs) :]
        except Exception as exc:  # every caller of this batch gets the failure, none waits forever
            error = exc if isinstance(exc, EngineError) else EngineError(f"embedding failed: {exc}")
            for caller in callers:
                caller.error = error
        finally:
            with self._cond:
                for caller in callers:
                    if caller.error is None and len(caller.vectors) != len(caller.inputs):
                        caller.error = EngineError("embedding was interrupted")
                    caller.done = True
                self._running = 0

    def _groups(self, inputs: Sequence[Sequence[int]]) -> list[list[Sequence[int]]]:
        """Consecutive inputs packed into calls of at most max_seqs sequences and n_ctx tokens in all."""
        groups: list[list[Sequence[int]]] = []
        cells = 0
        for tokens in inputs:
            if not groups or len(groups[-1]) == self.config.max_seqs or cells + len(tokens) > self.n_ctx:
                groups.append([])
                cells = 0
            groups[-1].append(tokens)
            cells += len(tokens)
        return groups

    def _decode(self, group: list[Sequence[int]]) -> list[np.ndarray]:
        llama_cpp.llama_memory_clear(self._mem, True)  # each call starts from empty sequences
        tokens = [t for seq in group for t in seq]
        positions = [p for seq in group for p in range(len(seq))]
        seq_ids = [i for i, seq in enumerate(group) for _ in seq]
        batch = self._batch.fill(tokens, positions, seq_ids, [True] * len(tokens))
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed ({status}) while embedding")
        self._calls += 1
        vectors = []
        for seq_id in range(len(group)):
            ptr = llama_cpp.llama_get_embeddings_seq(self._ctx, seq_id)
            if not ptr:
                raise EngineError(f"llama.cpp returned no pooled embedding for sequence {seq_id}")
            vectors.append(np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy())
        return vectors

    # ---- the Engine protocol ------------------------------------------------------------------------
    def start(self) -> None:
        """Nothing to start: embed() runs on the caller's thread."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        raise EngineError("this is an embedding model: it answers /v1/embeddings only")
        yield  # pragma: no cover  (makes this an async generator, as the protocol wants)

    def abort(self, request_id: str) -> None:
        """Embedding calls are short and not abortable; there is nothing to abort."""

    def stats(self) -> EngineStats:
        with self._cond:
            busy, running = self._in_flight, self._running
        return EngineStats(
            running=running,
            waiting=max(busy - running, 0),
            kv_used=0,
            kv_total=self.n_ctx,
            steps=self._calls,
            preemptions=0,
        )

    def shutdown(self, timeout: float = 10.0) -> None:
        """Free the context and model once the batch in progress (if any) has finished; callers still
        queued then get EngineError."""
        with self._cond:
            while self._decoding:
                self._cond.wait()
            if self._closed:
                return
            self._closed = True
            self._batch.free()
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)

    def close(self) -> None:
        self.shutdown()


__all__ = ["LlamaEmbedder"]
