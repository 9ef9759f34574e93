"""The CPU/edge engine: llama.cpp's kernels, our own continuous batching.

Contract: submit() validates a GenerationRequest (raising EngineError for what can never run) and queues
it; each step() is schedule → one llama_decode for all running sequences → sample and emit per sequence.
The engine runs steps on its own thread once start()ed, or inline through generate_sync() when not.
generate() is the async face: an async iterator of TokenEvents; leaving it early aborts the request and
frees its KV cells within one step. An unexpected failure while starting or sampling one sequence ends
only that sequence (finish_reason "error"); the loop and every other request go on. stats() returns the
snapshot the engine thread publishes under its lock after each step, so any thread may call it.
Multi-turn reuse: with state_cache_mb > 0, idle prefix caches are saved to a bounded LRU of sequence
states before their cells are dropped, and on recurrent (hybrid) models, whose state cannot be cut back,
each prompt's state is also saved where its last message starts (the last <|im_start|>), so the next
turn restores it and prefills only its new tokens; TokenEvent.cached_tokens counts the reused tokens.
LoRA adapters (config.loras) load at start; a request names one in GenerationRequest.adapter, and each
step serves one adapter group (adapters.py), so requests with different adapters never share a decode.
Images (config.mmproj): submit() expands each <|image_pad|> of the prompt into the image's tokens (image
keys, see image_tokens.py), so limits, usage and prefix reuse count them; the vision tower encodes each
image on a thread of its own (vision.EncodeWorker) while the loop keeps stepping, and the embeddings are
then decoded in runs that take the prefill budget like prompt tokens, so no stream stalls for an encode.
A prefix holding the same image (its pixel hash) is reused instead of encoded again.
Bursts: given the server's Arrivals (watch_arrivals), an idle engine that wakes on a submit waits up to
GATHER_MAX_S while the server still reads other requests, so they start together in one step.
Knows nothing of chat templates or HTTP beyond Qwen's control tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from qwenkit.engines.arrivals import Arrivals
from qwenkit.engines.checks import check_prompt_ids, check_room, check_sampling_ids
from qwenkit.engines.courier import Courier
from qwenkit.engines.llamacpp.adapters import Adapters
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.costs import StepCosts
from qwenkit.engines.llamacpp.image_tokens import ImageSpan, image_keys
from qwenkit.engines.llamacpp.kv import SlotManager
from qwenkit.engines.llamacpp.model import LlamaModel
from qwenkit.engines.llamacpp.sampler import Candidates, SeqSampler, check_grammar, logprobs_for
from qwenkit.engines.llamacpp.scheduler import Scheduler, StepPlan
from qwenkit.engines.llamacpp.sequence import Sequence, Status
from qwenkit.engines.llamacpp.state_cache import StateCache
from qwenkit.engines.llamacpp.threads import ThreadGovernor
from qwenkit.engines.llamacpp.vision import EncodeWorker, VisionEncoder
from qwenkit.engines.request import (
    THINKING_EARLY_STOP,
    EngineError,
    EngineOverloaded,
    EngineStats,
    GenerationRequest,
    TokenEvent,
)

log = logging.getLogger("qwenkit.engine")

MAX_LOGPROBS = 20
# How much longer than a decode-only step a step carrying a prompt chunk may take: the running streams'
# inter-token latency then stays under 3x its usual value, with some room for noise.
CHUNK_STEP_COST = 2.5
# Longest an idle engine waits for requests the server is still reading before it starts a step: 16 requests
# arriving together take ~10-20 ms to parse, render and tokenize on the event loop; a first step of one
# 70-token prompt takes ~150 ms on 2 cores, and the rest would wait for it.
GATHER_MAX_S = 0.05
# How stale stats() may be while nothing but decoding happens (a snapshot costs ~40 µs after every step).
STATS_EVERY_S = 0.05


class LlamaCppEngine:
    def __init__(self, gguf_path: Path, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        if self.config.n_batch < self.config.max_seqs:
            raise EngineError(
                "n_batch must be at least max_seqs (every running sequence feeds a token per step)"
            )
        self.model = LlamaModel(Path(gguf_path), self.config)
        try:
            self.adapters = Adapters(self.model, self.config.loras)
        except EngineError:
            self.model.close()
            raise
        self.vision: VisionEncoder | None = None
        if self.config.mmproj is not None:
            try:
                self.vision = VisionEncoder(self.config.mmproj, self.model, threads=self.config.threads)
            except EngineError:
                self.model.close()
                raise
        self._image_pad = self.model.token_id("<|image_pad|>")
        self._encoded: list[tuple[Sequence, ImageSpan, object]] = []  # finished encodes (worker → loop)
        self._encoding = 0  # encodes submitted and not yet taken back
        self._blocked = False  # the last step had nothing to run but an encode to wait for
        self._encoder = EncodeWorker(self.vision, self._encode_done) if self.vision else None
        self.n_ctx = self.model.n_ctx_seq  # the most tokens one sequence may hold
        mb = self.config.state_cache_mb
        self.states = StateCache(mb * 1024 * 1024) if mb else None
        self.costs = StepCosts(CHUNK_STEP_COST, self.model.n_ubatch)
        fixed = self.config.prefill_chunk  # a fixed chunk is per prefilling sequence
        budget = (lambda n_decode, n_prefilling: fixed * n_prefilling) if fixed else self.costs.budget
        self.scheduler = Scheduler(
            SlotManager(
                self.model,
                self.config.max_seqs,
                self.config.prefix_cache,
                self.config.kv_unified,
                states=self.states,
            ),
            self.model.n_ctx,
            self.model.n_batch,
            self.config.max_seqs,
            prefill_budget=budget,
            group=self.adapters.choose if self.adapters.names else None,
        )
        self._think_start = self.model.token_id("<think>")
        self._think_end = self.model.token_id("</think>")
        self._turn_start = self.model.token_id("<|im_start|>")
        self._early_stop = self.model.tokenize(THINKING_EARLY_STOP, parse_special=True)
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._by_id: dict[str, Sequence] = {}
        self._cv = threading.Condition()
        self._arrivals = itertools.count()
        self._thread: threading.Thread | None = None
        self._courier = Courier()
        self._stopping = False
        self._accepting = True
        self.steps = 0
        self._candidates = Candidates(self.model.n_vocab)  # shared by the sequences' samplers
        self.governor = ThreadGovernor(self.config.threads) if self.config.adapt_threads else None
        self._incoming: Arrivals | None = None  # requests the server is reading (watch_arrivals)
        self._gather_max = GATHER_MAX_S
        self._stats = self._snapshot()
        self._stats_due = 0.0  # when a step's snapshot is due even if no request came, went or changed

    # ---- submitting -------------------------------------------------------------------------------
    def watch_arrivals(self, arrivals: Arrivals, max_wait: float = GATHER_MAX_S) -> None:
        """Going from idle to busy, wait (at most max_wait seconds) for the requests arrivals counts."""
        self._incoming = arrivals
        self._gather_max = max_wait

    def submit(self, request: GenerationRequest, sink: Callable[[TokenEvent], None]) -> None:
        """Queue a request; its events go to sink (called on the engine thread)."""
        check_prompt_ids(request.prompt_token_ids, self.model.n_vocab)
        tokens, images = self._expand(request)  # their PreparedImages free themselves if this raises
        max_tokens = request.sampling.max_tokens
        room = check_room(len(tokens), max_tokens, self.n_ctx)
        check_sampling_ids(request, self.model.n_vocab, MAX_LOGPROBS)
        if request.grammar is not None:
            check_grammar(self.model, request.grammar)
        self.adapters.check(request.adapter)
        new = next(self._arrivals)
        seq = Sequence(request, sink, max_new=max_tokens or room, arrival=new, tokens=tokens, images=images)
        with self._cv:
            if not self._accepting:
                raise EngineOverloaded("the engine is shutting down")
            if request.request_id in self._by_id:
                raise EngineError(f"request id {request.request_id!r} is already running")
            if len(self.scheduler.waiting) + len(self._inbox) >= self.config.max_waiting:
                raise EngineOverloaded("too many requests waiting; retry later")
            self._by_id[request.request_id] = seq
            self._inbox.append(seq)
            self._cv.notify()

    def _expand(self, request: GenerationRequest) -> tuple[list[int], list[ImageSpan]]:
        """The prompt with each image marker replaced by the image's keys, and the images' spans."""
        prompt = request.prompt_token_ids
        if not request.images and self.vision is None:
            return list(prompt), []  # a text engine: <|image_pad|> is just a token
        if self.vision is None:
            raise EngineError(
                "this model was started without a vision projector, so it cannot read images: "
                "start with --mmproj FILE"
            )
        markers = prompt.count(self._image_pad) if self._image_pad is not None else 0
        if markers != len(request.images):
            raise EngineError(
                f"the prompt has {markers} image marker(s) (<|image_pad|>) but {len(request.images)} "
                "image(s): give one marker per image"
            )
        if not markers:
            return list(prompt), []
        if prompt[-1] == self._image_pad:
            raise EngineError("the prompt ends with an image: put text after it")
        tokens: list[int] = []
        spans: list[ImageSpan] = []
        pictures = iter(request.images)
        for token in prompt:
            if token != self._image_pad:
                tokens.append(token)
                continue
            image = next(pictures)
            prepared = self.vision.prepare(image.pixels)  # VisionError (an EngineError) for bad pixels
            n_pos = self.vision.n_pos(prepared)
            try:
                keys = image_keys(image.sha256, prepared.n_tokens, n_pos)
            except ValueError:
                prepared.close()
                raise EngineError("an image's sha256 must be 64 hex digits (of its decoded pixels)") from None
            spans.append(ImageSpan(len(tokens), prepared.n_tokens, n_pos, image.sha256, prepared))
            tokens.extend(keys)
        return tokens, spans

    @property
    def image_encodes(self) -> int:
        """How many times the vision tower ran (prefix reuse shows as encodes not made)."""
        return self.vision.encodes if self.vision is not None else 0

    def _encode_done(self, tag: object, result: object) -> None:
        """Called on the encode thread: hand the embeddings (or the error) to the loop."""
        seq, span = tag  # type: ignore[misc]
        with self._cv:
            self._encoded.append((seq, span, result))
            self._cv.notify()

    def _request_encodes(self) -> None:
        """Start encoding every image a running sequence still has to feed (and is not held by a prefix)."""
        for seq in self.scheduler.running:
            for span in seq.images:
                if span.end > seq.n_cached and span.embd is None and not span.encoding:
                    span.encoding = True
                    self._encoding += 1
                    self._encoder.submit((seq, span), span.prepared.copy())  # type: ignore[union-attr]

    def _take_encodes(self) -> None:
        with self._cv:
            done, self._encoded = self._encoded, []
        for seq, span, result in done:
            span.encoding = False
            self._encoding -= 1
            if seq.status is Status.FINISHED:
                continue
            if isinstance(result, BaseException):
                reason = f"the image could not be encoded: {result}"
                self._finish(seq, "error", [], self._flush_text(seq), error=reason)
            elif span.end > seq.n_cached:
                span.embd = result  # type: ignore[assignment]

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is; it gets a final event with finish_reason 'abort'."""
        with self._cv:
            if request_id in self._by_id:
                self._aborts.add(request_id)
                self._cv.notify()

    # ---- one step: schedule → run → postprocess ---------------------------------------------------
    def step(self) -> bool:
        """Run one decode step; returns whether work remains."""
        try:
            if self._incoming is not None and not self.scheduler.has_work():
                self._gather(self._incoming)
            self._drain_inbox()
            if self._encoder is not None:
                self._take_encodes()
            self.scheduler.admit()
            if self._encoder is not None:
                self._request_encodes()
            plan = self.scheduler.plan()
            self._blocked = not plan.entries and self._encoding > 0
            if plan.entries:
                if self.governor is not None:
                    self._govern_threads(self.governor)
                self._run(plan)
            elif self._blocked and self._thread is None:  # driven inline: wait for the encode, not spin
                with self._cv:
                    self._cv.wait_for(lambda: self._encoded or self._aborts or self._inbox, timeout=0.5)
        finally:
            self._publish_stats()
            self._courier.flush()
        return self.scheduler.has_work() or bool(self._inbox)

    def _gather(self, incoming: Arrivals) -> None:
        # Each submit notifies the condition; a request answered without the engine does not, hence the
        # short timeout. The server leaves the count right before it submits: after the last one left,
        # give its submit a moment (it notifies) so it lands in this step.
        deadline = time.perf_counter() + self._gather_max
        waited = False
        with self._cv:
            while incoming.pending() > 0 and not self._stopping:
                left = deadline - time.perf_counter()
                if left <= 0:
                    return
                waited = True
                self._cv.wait(min(left, 0.002))
            if waited:
                self._cv.wait(0.001)

    def _govern_threads(self, governor: ThreadGovernor) -> None:
        change = governor.tick()
        if change is not None:
            self.model.set_threads(change[0])
            log.info("threads: %s", change[1])

    def _drain_inbox(self) -> None:
        if not (self._inbox or self._aborts):  # unlocked peek: what lands after it is drained next step
            return
        with self._cv:
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for seq in new:
            try:
                self._start(seq)
            except Exception as exc:  # this request fails; the rest of the inbox and the aborts go on
                self._fail(seq, exc)
        for request_id in aborts:
            seq = self._by_id.get(request_id)
            if seq is not None and seq.status is not Status.FINISHED:
                try:
                    self._finish(seq, "abort", [], self._flush_text(seq))
                except Exception as exc:
                    self._fail(seq, exc)

    def _start(self, seq: Sequence) -> None:
        req = seq.request
        thinking = req.thinking
        grammar_now = req.grammar is not None and not (
            req.grammar.after_think and thinking and thinking.starts_inside
        )
        stop_ids: set[int] = set()
        if req.sampling.min_tokens:
            stop_ids = set(req.stop_token_ids) | (set() if req.ignore_eos else set(self.model.eog_ids))
        try:
            seq.sampler = SeqSampler(
                self.model,
                req.sampling,
                req.grammar,
                grammar_active=grammar_now,
                stop_ids=stop_ids,
                candidates=self._candidates,
            )
        except EngineError as exc:
            self._finish(seq, "error", [], "", error=str(exc))
            return
        seq.snapshot_at = self._snapshot_point(tuple(seq.tokens))
        self.scheduler.waiting.append(seq)

    def _snapshot_point(self, prompt: tuple[int, ...]) -> int:
        """Where the last message starts: the next turn's prompt repeats everything before it, even when
        the template re-renders this turn's answer differently (thinking dropped). Only recurrent models
        need it: an attention-only cache is cut back to any prefix instead."""
        if self.states is None or not self.model.recurrent or self._turn_start is None:
            return 0
        for i in range(len(prompt) - 1, 0, -1):
            if prompt[i] == self._turn_start:
                return i
        return 0

    def _run(self, plan: StepPlan) -> None:
        self.adapters.activate(plan.entries[0][0].request.adapter)  # one adapter group per step
        t0 = time.perf_counter()
        # Image runs first, each a call of its own (embeddings, no logits): a later call would overwrite
        # the logits the token batch leaves for sampling.
        entries = plan.entries
        for seq, n in [(s, n) for s, n in plan.entries if s.images and s.image_at(s.n_cached) is not None]:
            entries = [(s, k) for s, k in entries if s is not seq]
            status = self._decode_image(seq, n)
            if status != 0:  # that sequence does not advance (and may have preempted another)
                self._decode_failed(StepPlan([(seq, n)]), status)
                entries = [(s, k) for s, k in entries if s.status is Status.RUNNING]
            else:
                self._advance(seq, n)
        tokens: list[int] = []
        positions: list[int] = []
        seq_ids: list[int] = []
        wants: list[bool] = []
        samples: list[tuple[Sequence, int]] = []
        # In seq-id order: llama.cpp computes each run of consecutive ids (per-sequence KV) in one pass.
        for seq, n in sorted(entries, key=lambda entry: entry[0].seq_id):
            start = seq.n_cached
            first = seq.position(start) if seq.images else start
            tokens.extend(seq.tokens[start : start + n])
            positions.extend(range(first, first + n))
            seq_ids.extend([seq.seq_id] * n)
            last = start + n == len(seq.tokens)
            wants.extend([False] * (n - 1) + [last])
            if last:
                samples.append((seq, len(tokens) - 1))
        status = self.model.decode(tokens, positions, seq_ids, wants) if tokens else 0
        elapsed = time.perf_counter() - t0
        if status != 0:
            self._decode_failed(StepPlan(entries), status)
            return
        self.steps += 1
        self._learn_timing(plan, elapsed)
        for seq, n in entries:
            self._advance(seq, n)
        for seq, index in samples:
            try:
                self._postprocess(seq, index)
            except Exception as exc:  # one sequence's failure must not stop the others
                self._fail(seq, exc)

    def _advance(self, seq: Sequence, n: int) -> None:
        """n more of seq's tokens are in the KV cache: save a snapshot there, or drop decoded image rows."""
        seq.n_cached += n
        if seq.images:
            span = seq.image_at(seq.n_cached - 1)
            if span is not None and seq.n_cached == span.end:
                span.embd = None  # decoded into the KV cache: the rows are no longer needed
        if seq.snapshot_at and seq.n_cached == seq.snapshot_at:
            self.scheduler.slots.save(seq.seq_id, seq.tokens[: seq.n_cached], space=seq.request.adapter)

    def _decode_image(self, seq: Sequence, n: int) -> int:
        """Decode n rows of the image seq is inside of, from where its KV cache ends."""
        start = seq.n_cached
        span: ImageSpan = seq.image_at(start)  # type: ignore[assignment]
        if span.positions is None:
            span.positions = self.vision.positions(span.prepared, seq.position(span.start))  # type: ignore
        off = start - span.start
        rows = span.embd[off : off + n]  # type: ignore[index]
        return self.model.decode_embd(rows, span.positions[:, off : off + n], seq.seq_id)

    def _decode_failed(self, plan: StepPlan, status: int) -> None:
        # 1 = no room for this batch in the KV cache: make room and let the next step retry.
        if status == 1 and (self.scheduler.slots.evict_lru() or self.scheduler.preempt_newest()):
            return
        for seq, _ in plan.entries:
            self._finish(seq, "error", [], self._flush_text(seq), error=f"llama_decode failed ({status})")

    def _learn_timing(self, plan: StepPlan, elapsed: float) -> None:
        n_prefill = sum(n for _, n in plan.entries if n > 1)
        n_decode = sum(1 for _, n in plan.entries if n == 1)
        self.costs.observe(n_decode, n_prefill, elapsed)

    def _postprocess(self, seq: Sequence, index: int) -> None:
        req = seq.request
        sampler: SeqSampler = seq.sampler  # type: ignore[assignment]
        token = sampler.sample(index, suppress_stops=seq.n_generated < req.sampling.min_tokens)
        logprobs = None
        if req.logprobs is not None:
            logprobs = [logprobs_for(self.model, index, token, req.logprobs)]
        seq.n_generated += 1
        if (not req.ignore_eos and self.model.is_eog(token)) or token in req.stop_token_ids:
            self._finish(seq, "stop", [token], self._flush_text(seq), logprobs=logprobs)
            return
        new = [token, *self._thinking_update(seq, token, sampler)]
        seq.tokens.extend(new)
        special = not req.sampling.skip_special_tokens
        text = "".join(seq.text.push(self.model.piece(t, special)) for t in new)
        out = seq.stops.push(text)
        if seq.stops.stopped:
            self._finish(seq, "stop", new, out, logprobs=logprobs)
        elif seq.n_generated >= seq.max_new or len(seq.tokens) >= self.n_ctx:
            self._finish(seq, "length", new, out + self._flush_text(seq), logprobs=logprobs)
        else:
            seq.emit(new, out, logprobs=logprobs)

    def _thinking_update(self, seq: Sequence, token: int, sampler: SeqSampler) -> list[int]:
        """Track <think>…</think>; past the budget, insert Qwen's early-stop text. Returns inserted tokens."""
        thinking = seq.request.thinking
        if thinking is None:
            return []
        if token == self._think_start and seq.n_generated == 1:
            seq.in_reasoning = True
            return []
        if not seq.in_reasoning:
            if seq.n_generated == 1 and seq.request.grammar is not None:
                sampler.activate_grammar()  # the model skipped thinking: constrain from here on
            return []
        if token == self._think_end:
            seq.in_reasoning = False
            sampler.activate_grammar()
            return []
        seq.reasoning_tokens += 1
        if thinking.budget is not None and seq.reasoning_tokens >= thinking.budget:
            seq.in_reasoning = False
            forced = list(self._early_stop)
            for t in forced:
                sampler.accept_forced(t)
            sampler.activate_grammar()
            seq.n_generated += len(forced)
            return forced
        return []

    def _flush_text(self, seq: Sequence) -> str:
        return seq.stops.push(seq.text.flush()) + seq.stops.flush()

    def _finish(self, seq: Sequence, reason: str, token_ids: list[int], text: str, **extra: object) -> None:
        self.scheduler.finish(seq)
        if seq.sampler is not None:
            seq.sampler.free()  # type: ignore[attr-defined]
            seq.sampler = None
        with self._cv:
            self._by_id.pop(seq.request_id, None)
        for span in seq.images:  # an encode in flight works on its own copy
            span.prepared.close()  # type: ignore[attr-defined]
            span.embd = None
        seq.emit(token_ids, text, finish=reason, **extra)  # type: ignore[arg-type]

    def _fail(self, seq: Sequence, exc: BaseException) -> None:
        """End one sequence after an unexpected error: it gets an error event, nothing else is touched."""
        log.error("request %s failed in the engine", seq.request_id, exc_info=exc)
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if seq.status is not Status.FINISHED:  # else its final event went out; only cleanup is left
            with contextlib.suppress(Exception):
                self._finish(seq, "error", [], "", error=f"engine error: {message}")
                return
        # A broken sink or a half-made sampler: at least forget the request.
        with contextlib.suppress(Exception):
            self.scheduler.finish(seq)
        seq.status = Status.FINISHED
        with self._cv:
            self._by_id.pop(seq.request_id, None)

    # ---- driving ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Run steps on a background thread until shutdown()."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="qwenkit-llamacpp", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                # Blocked: every runnable sequence waits for an image encode, which notifies when done.
                while not (
                    self._inbox
                    or self._aborts
                    or self._encoded
                    or (self.scheduler.has_work() and not self._blocked)
                    or self._stopping
                ):
                    self._cv.wait()
                if self._stopping and not self.scheduler.has_work() and not self._inbox:
                    return
            try:
                self.step()
            except Exception as exc:  # e.g. llama_decode itself: fail what was scheduled, keep looping
                for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self._fail(seq, exc)
                self._publish_stats()
                self._courier.flush()

    def generate_sync(self, request: GenerationRequest) -> Iterator[TokenEvent]:
        """Events of one request, blocking; drives the steps itself when no background thread runs."""
        events: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self.submit(request, events.put)
        finished = False
        try:
            while not finished:
                if self._thread is None:
                    self.step()
                    while not events.empty():
                        event = events.get()
                        finished = event.finished
                        yield event
                else:
                    event = events.get()
                    finished = event.finished
                    yield event
        finally:
            if not finished:
                self.abort(request.request_id)
                if self._thread is None:
                    self._drain_inbox()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Events of one request; needs start(). Closing the iterator early aborts the request."""
        if self._thread is None:
            raise EngineError("the engine is not started; call start() first")
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        if request.images:  # preprocessing (resizing) images is CPU work: not on the event loop
            await asyncio.to_thread(self.submit, request, self._courier.sink(events))
        else:
            self.submit(request, self._courier.sink(events))
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = event.finished
                yield event
        finally:
            if not finished:
                self.abort(request.request_id)

    def stats(self) -> EngineStats:
        """The engine's state after its last step (any thread): the engine thread's own dicts and lists
        are never read from here, since it may be changing them."""
        with self._cv:
            # Every request not yet finished is in _by_id (kept under this lock), so a request the engine
            # thread took from the inbox mid-step still counts as waiting.
            waiting = max(0, len(self._by_id) - self._stats.running)
            return dataclasses.replace(self._stats, waiting=waiting, steps=self.steps)

    def _snapshot(self) -> EngineStats:
        s = self.scheduler
        states = self.states
        return EngineStats(
            running=len(s.running),
            waiting=len(s.waiting),
            kv_used=s.kv_used(),
            kv_total=self.model.n_ctx,
            steps=self.steps,
            preemptions=s.preemptions,
            state_cache_bytes=states.bytes if states else 0,
            state_cache_entries=len(states) if states else 0,
            state_cache_hits=states.hits if states else 0,
            state_cache_evictions=states.evictions if states else 0,
            image_encodes=self.image_encodes,
            threads=self.governor.current if self.governor else self.config.threads,
        )

    def _publish_stats(self) -> None:
        """Called by whoever runs the steps (the engine thread once started): a new snapshot when requests
        started, finished or were preempted, else at most every STATS_EVERY_S (the KV use it shows moves
        by one cell a step per stream)."""
        s, last = self.scheduler, self._stats
        now = time.monotonic()
        if (
            now < self._stats_due
            and len(s.running) == last.running
            and len(s.waiting) == last.waiting
            and s.preemptions == last.preemptions
        ):
            return
        self._stats_due = now + STATS_EVERY_S
        snapshot = self._snapshot()
        with self._cv:
            self._stats = snapshot

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop admitting, let running requests finish for up to `timeout` s, abort the rest, free memory."""
        with self._cv:
            self._accepting = False
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            while self.scheduler.has_work() and time.monotonic() < deadline:
                time.sleep(0.02)
            with self._cv:
                for request_id in list(self._by_id):
                    self._aborts.add(request_id)
                self._stopping = True
                self._cv.notify()
            self._thread.join()
            self._thread = None
        else:
            with self._cv:
                self._aborts.update(self._by_id)
            self._drain_inbox()
        if self._encoder is not None:
            self._encoder.close()
        if self.vision is not None:
            self.vision.close()
        self.model.close()

    def close(self) -> None:
        self.shutdown(timeout=0)


__all__ = ["LlamaCppEngine"]
