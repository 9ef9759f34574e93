"""The GPU engine: vLLM's AsyncLLM behind qwenkit's Engine protocol (tensor/pipeline/expert parallel, Ray).

Contract: VllmEngine(llm, ...) adapts any object with AsyncLLM's generate/abort/shutdown; from_settings()
builds the real one (vLLM imported only there). generate() checks what can never run (EngineError,
before vLLM sees it: images for a model without a vision tower, image markers that do not match the
images, a prompt whose images' tokens leave no room), translates the request with translate.py, and
streams TokenEvents from vLLM's delta outputs; leaving the iterator early aborts the request in vLLM. A
failure inside vLLM ends only that request (finish_reason "error"). stats() counts the adapter's own
in-flight requests and their tokens (vLLM keeps its scheduler's numbers in its engine-core process).
shutdown() stops admitting, waits for running requests up to the timeout, aborts the rest and shuts vLLM
down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from qwenkit.engines.checks import check_prompt_ids, check_room, check_sampling_ids, wait_drained
from qwenkit.engines.request import EngineError, EngineOverloaded, EngineStats, GenerationRequest, TokenEvent
from qwenkit.engines.vllm.translate import (
    EventTracker,
    VllmSettings,
    engine_args,
    generate_kwargs,
    sampling_kwargs,
)
from qwenkit.media.images import VisionSpec, image_tokens

log = logging.getLogger("qwenkit.engine")

MAX_LOGPROBS = 20


class AsyncLLMLike(Protocol):
    """The part of vllm.v1.engine.async_llm.AsyncLLM the adapter uses."""

    def generate(self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any) -> Any: ...

    async def abort(self, request_id: str) -> None: ...

    def shutdown(self) -> None: ...


def vllm_sampling_params(kwargs: dict[str, Any]) -> Any:
    """vllm.SamplingParams from translate.sampling_kwargs() (vLLM imported here, on first use)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    values = dict(kwargs)
    values["output_kind"] = RequestOutputKind[values["output_kind"]]
    if "structured_outputs" in values:
        values["structured_outputs"] = StructuredOutputsParams(**values["structured_outputs"])
    return SamplingParams(**values)


class VllmEngine:
    def __init__(
        self,
        llm: AsyncLLMLike | None,
        n_ctx: int,
        vocab_size: int,
        think_ids: tuple[int | None, int | None] = (None, None),
        make_params: Callable[[dict[str, Any]], Any] = vllm_sampling_params,
        kv_total: int | None = None,
        build: Callable[[], AsyncLLMLike] | None = None,
        vision: VisionSpec | None = None,
        image_pad: int | None = None,
    ) -> None:
        """llm: the AsyncLLM, or None and `build`, which makes it in start() (the weights load there).
        vision: the model's image grid (None: a text model, images are refused); image_pad: the
        <|image_pad|> id that marks each image's place in a prompt."""
        self._llm = llm
        self._build = build
        self.n_ctx = n_ctx
        self.vocab_size = vocab_size
        self._think_start, self._think_end = think_ids
        self._make_params = make_params
        self._kv_total = kv_total or n_ctx
        self.vision = vision
        self._image_pad = image_pad
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}  # request id -> tokens it holds (prompt + generated)
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}
        self._aborting: set[str] = set()  # aborts already sent to vLLM (sent once per request)
        self._accepting = True
        self.steps = 0

    @classmethod
    def from_settings(
        cls,
        settings: VllmSettings,
        vocab_size: int,
        think_ids: tuple[int | None, int | None],
        vision: VisionSpec | None = None,
        image_pad: int | None = None,
    ) -> VllmEngine:
        """The real engine; AsyncLLM (and the weights) load when start() is called."""

        def build() -> AsyncLLMLike:
            from vllm.config.reasoning import ReasoningConfig
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            kwargs = engine_args(settings)
            kwargs["reasoning_config"] = ReasoningConfig(**kwargs["reasoning_config"])
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

        return cls(
            None,
            settings.max_model_len,
            vocab_size,
            think_ids,
            build=build,
            vision=vision,
            image_pad=image_pad,
        )

    def start(self) -> None:
        """Build vLLM's engine (the weights load here) once; a failure is one EngineError line."""
        if self._llm is not None or self._build is None:
            return
        try:
            self._llm = self._build()
        except Exception as exc:
            log.error("vLLM could not start", exc_info=exc)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EngineError(
                f"vLLM could not load the model ({first}): check the checkpoint, free GPU memory or lower "
                "--gpu-memory-utilization / --ctx, or serve it with --engine llamacpp"
            ) from None

    def check(self, request: GenerationRequest) -> int:
        """Refuse, before vLLM sees it, what can never run (the same rules as the llama.cpp engine); the
        prompt's length as vLLM will see it (each image's marker expanded to its tokens)."""
        check_prompt_ids(request.prompt_token_ids, self.vocab_size)
        n_prompt = len(request.prompt_token_ids) + self._image_extra(request)
        check_room(n_prompt, request.sampling.max_tokens, self.n_ctx)
        check_sampling_ids(request, self.vocab_size, MAX_LOGPROBS)
        return n_prompt

    def _image_extra(self, request: GenerationRequest) -> int:
        """Tokens the request's images add beyond their one marker each (vLLM's Qwen-VL processors make
        (height / factor) x (width / factor) of them for pixels already on the processor's grid)."""
        if not request.images:
            return 0
        if self.vision is None:
            raise EngineError(
                "this model has no vision tower (no preprocessor_config.json), so it cannot read images: "
                "send text, or serve a Qwen vision model"
            )
        prompt = request.prompt_token_ids
        markers = prompt.count(self._image_pad) if self._image_pad is not None else 0
        if markers != len(request.images):
            raise EngineError(
                f"the prompt has {markers} image marker(s) (<|image_pad|>) but {len(request.images)} "
                "image(s): give one marker per image"
            )
        return sum(image_tokens(image.pixels, self.vision) - 1 for image in request.images)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Events of one request; needs start(). Closing the iterator early aborts it in vLLM."""
        if self._llm is None:
            raise EngineError("the engine is not started; call start() first")
        n_prompt = self.check(request)
        values = sampling_kwargs(request, self.n_ctx, n_prompt)  # EngineError: a grammar vLLM cannot take
        try:
            params = self._make_params(values)
        except (TypeError, ValueError) as exc:  # vLLM's own validation of the values
            raise EngineError(f"vLLM refused the sampling parameters: {exc}".splitlines()[0]) from None
        rid = request.request_id
        with self._lock:
            if not self._accepting:
                raise EngineOverloaded("the engine is shutting down")
            if rid in self._running:
                raise EngineError(f"request id {rid!r} is already running")
            self._running[rid] = n_prompt
            self._loops[rid] = asyncio.get_running_loop()
        kwargs = generate_kwargs(request)
        tracker = EventTracker(request, self._think_start, self._think_end, n_prompt)
        finished = False
        stream = self._llm.generate(kwargs.pop("prompt"), params, kwargs.pop("request_id"), **kwargs)
        try:
            async for output in stream:
                event = tracker.event(output)
                with self._lock:
                    self.steps += 1
                    self._running[rid] = event.prompt_tokens + event.completion_tokens
                finished = event.finished
                yield event
                if finished:
                    return
            finished = True  # vLLM's stream ended without a finished output
            yield self._error_event(request, tracker, "vLLM ended the stream without finishing the request")
        except Exception as exc:  # EngineDeadError and the like: this request ends, the server goes on
            if finished:
                raise
            finished = True
            if isinstance(exc, ValueError) and not tracker.completion_tokens:  # refused as it was added
                message = str(exc).strip().splitlines()[0] if str(exc).strip() else "vLLM refused the request"
                raise EngineError(message) from None
            log.error("request %s failed in vLLM", rid, exc_info=exc)
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            yield self._error_event(request, tracker, f"engine error: {message}")
        finally:
            with self._lock:
                self._running.pop(rid, None)
                self._loops.pop(rid, None)
                sent = rid in self._aborting
                self._aborting.discard(rid)
            if not finished and not sent:
                with contextlib.suppress(Exception):
                    await self._llm.abort(rid)
            with contextlib.suppress(Exception):
                await stream.aclose()

    @staticmethod
    def _error_event(request: GenerationRequest, tracker: EventTracker, message: str) -> TokenEvent:
        return TokenEvent(
            request.request_id,
            [],
            "",
            "error",
            prompt_tokens=tracker.prompt_tokens or len(request.prompt_token_ids),
            completion_tokens=tracker.completion_tokens,
            reasoning_tokens=tracker.reasoning_tokens,
            error=message.splitlines()[0],
        )

    def abort(self, request_id: str) -> None:
        """Ask vLLM to stop the request (from any thread); its stream ends with finish_reason 'abort'."""
        with self._lock:
            loop = self._loops.get(request_id)
            if loop is None or self._llm is None or request_id in self._aborting:
                return
            self._aborting.add(request_id)
        llm = self._llm
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.create_task(llm.abort(request_id))
        else:
            asyncio.run_coroutine_threadsafe(llm.abort(request_id), loop)

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                running=len(self._running),
                waiting=0,
                kv_used=sum(self._running.values()),
                kv_total=self._kv_total,
                steps=self.steps,
                preemptions=0,
            )

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop admitting, let running requests finish for up to `timeout` s, abort the rest, stop vLLM."""
        with self._lock:
            self._accepting = False
        wait_drained(lambda: bool(self._running), timeout)
        with self._lock:
            left = list(self._running)
        for request_id in left:
            self.abort(request_id)
        if self._llm is not None:
            self._llm.shutdown()


__all__ = ["AsyncLLMLike", "VllmEngine", "vllm_sampling_params"]
