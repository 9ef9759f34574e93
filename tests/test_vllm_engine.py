"""The vLLM engine adapter: its pure translations (checked against vLLM's own types where vLLM imports),
and the server running on it through the Engine protocol only, over a scripted stand-in for AsyncLLM.

Without vLLM installed (this machine: vLLM pins a CUDA torch) the translations are checked as the plain
values vLLM's constructors take; the `vllm_types` tests run where `import vllm` works (e.g. a scratch venv
with `pip install --no-deps vllm`) and skip elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from qwenkit.chat.families import QWEN3_5
from qwenkit.engines.base import Engine
from qwenkit.engines.request import (
    THINKING_EARLY_STOP,
    EngineError,
    GenerationRequest,
    Grammar,
    ImageInput,
    RequestTooLong,
    ThinkingControl,
)
from qwenkit.engines.sampling import SamplingParams
from qwenkit.engines.vllm import unavailable_reason
from qwenkit.engines.vllm.engine import VllmEngine
from qwenkit.engines.vllm.translate import (
    EventTracker,
    VllmSettings,
    engine_args,
    generate_kwargs,
    reasoning_ended,
    sampling_kwargs,
)
from qwenkit.media.images import VisionSpec, image_tokens, prepare_image, smart_resize
from qwenkit.tokenizer.specials import IMAGE_PAD
from qwenkit.tokenizer.tokenizer import QwenTokenizer
from serve_fixtures import MODEL, demo_app, in_process, serve_app

SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})


def full_request(**over: Any) -> GenerationRequest:
    sampling = SamplingParams(
        temperature=0.6,
        top_p=0.95,
        top_k=20,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=1.1,
        seed=7,
        stop=("END",),
        min_tokens=2,
        logit_bias={5: -100.0, 9: 2.5},
        include_stop_str_in_output=True,
        skip_special_tokens=False,
    )
    fields: dict[str, Any] = {
        "request_id": "r1",
        "prompt_token_ids": (1, 2, 3, 4),
        "sampling": sampling,
        "stop_token_ids": frozenset({151645, 151643}),
        "ignore_eos": True,
        "grammar": Grammar(gbnf="root ::= x", json_schema=SCHEMA),
        "thinking": ThinkingControl(starts_inside=True, budget=64),
        "logprobs": 3,
    }
    fields.update(over)
    return GenerationRequest(**fields)


# ---- translations ---------------------------------------------------------------------------------------
def test_sampling_translation_carries_every_field() -> None:
    kwargs = sampling_kwargs(full_request(), n_ctx=100)
    assert kwargs == {
        "n": 1,
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "repetition_penalty": 1.1,
        "seed": 7,
        "stop": ["END"],
        "stop_token_ids": [151643, 151645],
        "ignore_eos": True,
        "max_tokens": 96,  # None: the request's room in the context (vLLM's own default is 16)
        "min_tokens": 2,
        "logprobs": 3,
        "logit_bias": {5: -100.0, 9: 2.5},
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
        "output_kind": "DELTA",
        "structured_outputs": {"json": SCHEMA},
        "thinking_token_budget": 64,
    }


def test_sampling_translation_of_a_plain_request() -> None:
    request = GenerationRequest("r", (1, 2), SamplingParams(max_tokens=5))
    kwargs = sampling_kwargs(request, n_ctx=50)
    assert kwargs["max_tokens"] == 5 and kwargs["top_k"] == -1 and kwargs["logit_bias"] is None
    assert kwargs["logprobs"] is None and kwargs["seed"] is None
    assert "structured_outputs" not in kwargs and "thinking_token_budget" not in kwargs


def test_a_gbnf_only_grammar_goes_to_vllm_as_xgrammar_ebnf() -> None:
    request = full_request(grammar=Grammar(gbnf='calls ::= <tool_call> "x"', root="calls"))
    assert sampling_kwargs(request, 100)["structured_outputs"] == {"grammar": 'root ::= "<tool_call>" "x"'}
    by_id = full_request(grammar=Grammar(gbnf='root ::= <[151657]> "x"'))
    with pytest.raises(EngineError, match="--engine llamacpp"):
        sampling_kwargs(by_id, 100)


@pytest.mark.parametrize(
    ("grammar", "thinking", "expected"),
    [
        (None, ThinkingControl(starts_inside=True), None),  # nothing to constrain
        (Grammar("g", json_schema=SCHEMA), None, True),  # no thinking: from the first token
        (Grammar("g", after_think=False, json_schema=SCHEMA), ThinkingControl(True), True),
        (Grammar("g", json_schema=SCHEMA), ThinkingControl(starts_inside=True), False),  # after </think>
        (Grammar("g", json_schema=SCHEMA), ThinkingControl(starts_inside=False), None),  # vLLM's parser
    ],
)
def test_grammar_applies_after_think(
    grammar: Grammar | None, thinking: ThinkingControl | None, expected: bool | None
) -> None:
    request = full_request(grammar=grammar, thinking=thinking)
    assert reasoning_ended(request) is expected
    kwargs = generate_kwargs(request)
    assert kwargs["prompt"] == {"prompt_token_ids": [1, 2, 3, 4]} and kwargs["request_id"] == "r1"
    assert kwargs.get("reasoning_ended") is expected


def test_engine_args_single_gpu_and_multi_node() -> None:
    one = engine_args(VllmSettings(model="/m", max_model_len=4096))
    assert one["tensor_parallel_size"] == 1 and one["distributed_executor_backend"] is None
    assert one["reasoning_parser"] == "qwen3"
    assert one["reasoning_config"]["reasoning_end_str"] == THINKING_EARLY_STOP
    many = engine_args(
        VllmSettings("/m", 8192, tensor_parallel=8, pipeline_parallel=2, expert_parallel=True, nodes=2)
    )
    assert many["distributed_executor_backend"] == "ray"
    assert (many["tensor_parallel_size"], many["pipeline_parallel_size"]) == (8, 2)
    assert many["enable_expert_parallel"] is True


def output(ids: list[int], text: str, finished: bool = False, reason: str | None = None, **kw: Any) -> Any:
    """A RequestOutput-shaped value (DELTA kind)."""
    completion = SimpleNamespace(token_ids=ids, text=text, finish_reason=reason, logprobs=kw.get("logprobs"))
    return SimpleNamespace(outputs=[completion], finished=finished, num_cached_tokens=kw.get("cached", 0))


def test_event_tracker_counts_tokens_reasoning_and_maps_finish() -> None:
    request = full_request(thinking=ThinkingControl(starts_inside=False, budget=2), logprobs=None)
    tracker = EventTracker(request, think_start=10, think_end=11)
    first = tracker.event(output([10, 20, 21], "<think>ab", cached=2))
    assert (first.completion_tokens, first.reasoning_tokens, first.cached_tokens) == (3, 2, 2)
    assert first.finish_reason is None and first.text == "<think>ab"
    second = tracker.event(output([22, 11, 30], "c</think>d"))
    assert second.reasoning_tokens == 2  # capped at the budget: the forced early-stop text is not counted
    last = tracker.event(output([], "", finished=True, reason="repetition"))
    assert last.finish_reason == "stop" and last.completion_tokens == 6 and last.prompt_tokens == 4
    error = EventTracker(request).event(output([1], "x", finished=True, reason="error"))
    assert error.finish_reason == "error" and error.error


def test_event_tracker_logprobs_keep_the_top_k_by_rank() -> None:
    lp = SimpleNamespace
    entries = {7: lp(logprob=-2.0, rank=4), 1: lp(logprob=-0.1, rank=1), 2: lp(logprob=-0.5, rank=2)}
    request = full_request(logprobs=2, thinking=None)
    event = EventTracker(request).event(output([7], "x", logprobs=[entries]))
    assert event.logprobs is not None
    (token,) = event.logprobs
    assert token.token_id == 7 and token.logprob == -2.0
    assert token.top == ((1, -0.1), (2, -0.5))


# ---- against vLLM's own types (where vLLM imports) ------------------------------------------------------
@pytest.fixture
def vllm_types() -> Any:
    return pytest.importorskip("vllm.sampling_params", reason="vLLM is not installed here")


def test_vllm_sampling_params_take_the_translation(vllm_types: Any) -> None:
    from qwenkit.engines.vllm.engine import vllm_sampling_params

    params = vllm_sampling_params(sampling_kwargs(full_request(), 100))
    assert isinstance(params, vllm_types.SamplingParams)
    assert (params.temperature, params.top_k, params.seed, params.max_tokens) == (0.6, 20, 7, 96)
    assert params.min_tokens == 2 and params.logprobs == 3 and params.ignore_eos is True
    assert set(params.stop_token_ids) == {151643, 151645} and params.stop == ["END"]
    assert params.logit_bias == {5: -100.0, 9: 2.5}
    assert params.output_kind is vllm_types.RequestOutputKind.DELTA
    assert params.structured_outputs.json == SCHEMA and params.thinking_token_budget == 64


def test_vllm_engine_args_take_the_translation(vllm_types: Any, demo_checkpoint: Callable[..., Path]) -> None:
    from vllm.config.reasoning import ReasoningConfig
    from vllm.engine.arg_utils import AsyncEngineArgs

    model = str(demo_checkpoint("qwen3", "tiny"))
    kwargs = engine_args(VllmSettings(model, 4096, tensor_parallel=2, nodes=2))
    kwargs["reasoning_config"] = ReasoningConfig(**kwargs["reasoning_config"])
    args = AsyncEngineArgs(**kwargs)
    assert args.tensor_parallel_size == 2 and args.distributed_executor_backend == "ray"
    assert args.reasoning_parser == "qwen3"


def test_event_tracker_reads_vllm_request_outputs(vllm_types: Any) -> None:
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, RequestOutput

    completion = CompletionOutput(0, "hi", [5, 6], None, [{5: Logprob(-0.2, 1)}, {6: Logprob(-1.0, 2)}])
    final = RequestOutput("r1", None, [1, 2, 3, 4], None, [completion], True, num_cached_tokens=3)
    completion.finish_reason = "length"
    event = EventTracker(full_request(logprobs=1, thinking=None)).event(final)
    assert event.finish_reason == "length" and event.token_ids == [5, 6] and event.cached_tokens == 3
    assert event.logprobs is not None and [t.top for t in event.logprobs] == [((5, -0.2),), ()]


# ---- the server on the adapter, through the Engine protocol only ----------------------------------------
@dataclass
class ScriptedAsyncLLM:
    """Stands in for vLLM's AsyncLLM: answers each request with `reply` one token per delta output, the
    way AsyncLLM does (an abort ends the stream with finish_reason "abort"); fail_after: raise then."""

    tokenizer: QwenTokenizer
    reply: str = "Paris is the capital."
    hold: bool = False  # after the first token, wait until aborted
    fail_after: int | None = None
    refuse: str | None = None  # raise this ValueError as the request is added (vLLM's validation)
    calls: list[tuple[Any, Any, dict[str, Any]]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    shut_down: bool = False

    async def generate(self, prompt: Any, params: Any, request_id: str, **kw: Any) -> AsyncIterator[Any]:
        self.calls.append((prompt, params, kw))
        if self.refuse is not None:
            raise ValueError(self.refuse)
        ids = self.tokenizer.encode(self.reply)
        for i, token in enumerate(ids):
            await asyncio.sleep(0)
            if request_id in self.aborted:
                yield output([], "", finished=True, reason="abort")
                return
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("EngineCore died")
            last = i == len(ids) - 1
            yield output([token], self.tokenizer.decode([token]), last, "stop" if last else None)
            while self.hold and request_id not in self.aborted:
                await asyncio.sleep(0.01)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.shut_down = True


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint: Callable[..., Path]) -> QwenTokenizer:
    return QwenTokenizer.from_dir(demo_checkpoint("qwen3", "tiny"))


def adapter(llm: ScriptedAsyncLLM, n_ctx: int = 2048, **kw: Any) -> VllmEngine:
    tok = llm.tokenizer
    think = (tok.special_id("<think>"), tok.special_id("</think>"))
    return VllmEngine(llm, n_ctx, tok.vocab_size, think, make_params=dict, **kw)


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 50}


def test_the_adapter_is_an_engine(tokenizer: QwenTokenizer) -> None:
    assert isinstance(adapter(ScriptedAsyncLLM(tokenizer)), Engine)


def test_server_streams_a_chat_answer_through_the_adapter(tokenizer: QwenTokenizer) -> None:
    llm = ScriptedAsyncLLM(tokenizer)
    engine = adapter(llm)
    with in_process(demo_app(engine, tokenizer)) as http:
        body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "seed": 3}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            chunks = [json.loads(line[6:]) for line in response.iter_lines() if line[6:].startswith("{")]
        whole = http.post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": {}}).json()
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == llm.reply and whole["choices"][0]["message"]["content"] == llm.reply
    assert chunks[-1]["usage"]["completion_tokens"] == len(tokenizer.encode(llm.reply))
    prompt, params, _ = llm.calls[0]
    assert tokenizer.decode(prompt["prompt_token_ids"]).rstrip().endswith("<|im_start|>assistant")
    assert params["max_tokens"] == 50 and params["seed"] == 3 and params["output_kind"] == "DELTA"
    assert tokenizer.special_id("<|im_end|>") in params["stop_token_ids"]
    assert engine.stats().running == 0 and llm.aborted == []


def test_server_turns_a_schema_into_vllm_structured_outputs(tokenizer: QwenTokenizer) -> None:
    llm = ScriptedAsyncLLM(tokenizer, reply='{"a": 1}')
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": json.loads(SCHEMA)}}
    with in_process(demo_app(adapter(llm), tokenizer)) as http:
        response = http.post("/v1/chat/completions", json={**CHAT, "response_format": fmt})
    assert response.status_code == 200, response.text
    _, params, kw = llm.calls[0]
    assert json.loads(params["structured_outputs"]["json"])["required"] == ["a"]
    assert "reasoning_ended" not in kw or isinstance(kw["reasoning_ended"], bool)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
            "required": ["city"],
        },
    },
}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_server_forces_a_tool_call_on_vllm(tokenizer: QwenTokenizer, choice: Any) -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    llm = ScriptedAsyncLLM(tokenizer, reply=call)
    no_think = {"enable_thinking": False}  # the grammar then applies from the first token
    body = {**CHAT, "tools": [WEATHER], "tool_choice": choice, "chat_template_kwargs": no_think}
    with in_process(demo_app(adapter(llm), tokenizer)) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    message = response.json()["choices"][0]["message"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    _, params, kw = llm.calls[0]
    grammar = params["structured_outputs"]["grammar"]  # the forced-call GBNF, as xgrammar EBNF
    assert "\nroot ::= " in grammar and '"<tool_call>"' in grammar and '"\\"get_weather\\""' in grammar
    assert kw["reasoning_ended"] is True


VISION = VisionSpec(patch_size=16, merge_size=2, min_pixels=65536, max_pixels=16777216)


def _image_part(height: int, width: int, seed: int) -> dict[str, Any]:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def test_server_sends_images_to_vllm_with_one_marker_each(tokenizer: QwenTokenizer) -> None:
    llm = ScriptedAsyncLLM(tokenizer, reply="a cat")
    engine = adapter(llm, n_ctx=4096, vision=VISION, image_pad=tokenizer.special_id(IMAGE_PAD))
    content = [_image_part(300, 200, 1), {"type": "text", "text": "and"}, _image_part(64, 500, 2)]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    with in_process(demo_app(engine, tokenizer, family=QWEN3_5, vision=VISION)) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    prompt, params, _ = llm.calls[0]
    ids, images = prompt["prompt_token_ids"], prompt["multi_modal_data"]["image"]
    assert ids.count(tokenizer.special_id(IMAGE_PAD)) == 2 and len(images) == 2  # vLLM expands each marker
    grid = [smart_resize(300, 200, VISION), smart_resize(64, 500, VISION)]  # the processor's grid, in order
    assert [im.shape[:2] for im in images] == grid and all(im.dtype == np.uint8 for im in images)
    # Each image's sha256 (of its size and pixels) is its id in vLLM's multimodal and prefix caches.
    assert prompt["multi_modal_uuids"]["image"] == [prepare_image(im, None).sha256 for im in images]
    seen = len(ids) + sum(image_tokens(im, VISION) - 1 for im in images)  # the prompt as vLLM sees it
    assert response.json()["usage"]["prompt_tokens"] == seen and params["max_tokens"] == 4096 - seen


def test_images_vllm_cannot_take_are_refused_before_it(tokenizer: QwenTokenizer) -> None:
    pad = tokenizer.special_id(IMAGE_PAD)
    image = ImageInput(np.zeros((64, 64, 3), np.uint8), "0" * 64)
    one = GenerationRequest("x", (1, pad, 2), images=(image,))
    engine = adapter(ScriptedAsyncLLM(tokenizer), n_ctx=64, vision=VISION, image_pad=pad)
    assert engine.check(one) == 3 + 3  # a 64x64 image is 2x2 tokens: three more than its marker
    with pytest.raises(EngineError, match="no vision tower"):
        adapter(ScriptedAsyncLLM(tokenizer)).check(one)
    with pytest.raises(EngineError, match=r"1 image marker.*but 2 image"):
        engine.check(GenerationRequest("x", (1, pad, 2), images=(image, image)))
    big = ImageInput(np.zeros((320, 320, 3), np.uint8), "0" * 64)  # 100 tokens: past this context
    with pytest.raises(RequestTooLong):
        engine.check(GenerationRequest("x", (1, pad, 2), images=(big,)))


def test_server_reports_a_failure_inside_vllm_and_goes_on(tokenizer: QwenTokenizer) -> None:
    llm = ScriptedAsyncLLM(tokenizer, fail_after=2)
    engine = adapter(llm)
    with in_process(demo_app(engine, tokenizer)) as http:
        failed = http.post("/v1/chat/completions", json=CHAT)
        llm.fail_after, llm.refuse = None, "thinking_token_budget needs reasoning_config"
        refused = http.post("/v1/chat/completions", json=CHAT)
        llm.refuse = None
        ok = http.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 400 and "reasoning_config" in refused.json()["error"]["message"]
    assert failed.status_code == 500 and "EngineCore died" in failed.json()["error"]["message"]
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == llm.reply


def test_requests_that_can_never_run_are_refused_before_vllm(tokenizer: QwenTokenizer) -> None:
    llm = ScriptedAsyncLLM(tokenizer)
    engine = adapter(llm, n_ctx=64)
    with in_process(demo_app(engine, tokenizer)) as http:
        too_long = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 60})
        bias = http.post("/v1/chat/completions", json={**CHAT, "logit_bias": {str(10**7): 1}})
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]["message"]
    assert bias.status_code == 400 and "vocabulary" in bias.json()["error"]["message"]
    assert llm.calls == []

    async def one(request: GenerationRequest) -> None:
        engine.start()
        async for _ in engine.generate(request):
            pass

    with pytest.raises(RequestTooLong):
        asyncio.run(one(GenerationRequest("x", tuple(range(64)))))


def test_a_client_that_leaves_aborts_the_request_in_vllm(tokenizer: QwenTokenizer) -> None:
    llm = ScriptedAsyncLLM(tokenizer, hold=True)
    engine = adapter(llm)
    with serve_app(demo_app(engine, tokenizer)) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
            next(response.iter_lines())  # the first chunk arrived; now hang up
        deadline = time.monotonic() + 10
        while not llm.aborted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(llm.aborted) == 1
        deadline = time.monotonic() + 10
        while engine.stats().running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.stats().running == 0
    assert llm.shut_down  # the server's shutdown reached vLLM


def test_unavailable_reason_names_the_llamacpp_engine() -> None:
    missing = unavailable_reason(has_module=lambda name: False)
    assert missing is not None and "vllm extra" in missing and "--engine llamacpp" in missing
    no_gpu = unavailable_reason(has_module=lambda name: True, gpu_count=lambda: 0)
    assert no_gpu is not None and "NVIDIA GPU" in no_gpu and "--engine llamacpp" in no_gpu
    short = unavailable_reason(4, has_module=lambda name: True, gpu_count=lambda: 2)
    assert short is not None and "4 GPUs" in short and "lists 2" in short
    assert unavailable_reason(2, has_module=lambda name: True, gpu_count=lambda: 8) is None


# ---- `qwenkit serve --engine vllm` / --replicas: bad input is one line, before any weights load ----------
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], "--engine llamacpp"),  # here: vLLM not installed, or no NVIDIA GPU
        (["--tensor-parallel", "3"], "--tensor-parallel 3 does not divide qwen3-tiny's 4 attention heads"),
        (["--replicas", "2"], "for copies of a vLLM model use --data-parallel"),
        (["--lora", "a=/tmp"], "--lora is a llama.cpp option"),
        (["--ray-address", "127.0.0.1:9"], "no Ray cluster answers at 127.0.0.1:9"),
    ],
)
def test_serve_engine_vllm_bad_input_is_one_line(
    demo_checkpoint: Callable[..., Path], extra: list[str], expected: str
) -> None:
    from typer.testing import CliRunner

    from qwenkit.cli import app as main_app

    if not extra and unavailable_reason() is None:
        pytest.skip("vLLM can run here: `serve --engine vllm` would start serving")
    model = str(demo_checkpoint("qwen3", "tiny"))
    args = ["serve", "--port", "0", "--model", model, "--engine", "vllm", *extra]
    result = CliRunner().invoke(main_app.app, args, terminal_width=400)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and expected in errors[0], result.output
    assert "Traceback" not in result.output


def test_serve_gguf_on_vllm_and_parallel_on_llamacpp_are_refused(demo_gguf: Callable[..., Path]) -> None:
    from typer.testing import CliRunner

    from qwenkit.cli import app as main_app

    runner = CliRunner()
    gguf = str(demo_gguf("qwen3", "tiny", "f32"))
    on_vllm = runner.invoke(main_app.app, ["serve", "--port", "0", "--model", gguf, "--engine", "vllm"])
    assert on_vllm.exit_code == 2 and "serve this .gguf with --engine llamacpp" in on_vllm.output
    parallel = runner.invoke(main_app.app, ["serve", "--port", "0", "--tensor-parallel", "2"])
    assert parallel.exit_code == 2 and "need --engine vllm" in parallel.output
    lone_ray = runner.invoke(main_app.app, ["serve", "--port", "0", "--ray-address", "127.0.0.1:9"])
    assert lone_ray.exit_code == 2 and "--ray-address needs --replicas" in lone_ray.output


def test_a_model_vllm_cannot_load_is_one_line() -> None:
    def build() -> Any:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nTraceback details")

    engine = VllmEngine(None, 2048, 100, build=build)
    with pytest.raises(EngineError, match=r"CUDA out of memory\. Tried") as info:
        engine.start()
    assert "\n" not in str(info.value) and "--engine llamacpp" in str(info.value)


@pytest.mark.parametrize(("arch", "sees_images"), [("qwen2_5_vl", True), ("qwen3", False)])
def test_open_vllm_gives_a_vision_checkpoint_its_image_grid(
    demo_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, arch: str, sees_images: bool
) -> None:
    import qwenkit.engines.vllm as vllm_pkg
    from qwenkit.cli.serve_engines import ScaleOptions, open_vllm

    monkeypatch.setattr(vllm_pkg, "unavailable_reason", lambda gpus=1: None)  # as on a GPU machine
    model = demo_checkpoint(arch, "tiny")
    opened = open_vllm(str(model), False, 4, 4096, ScaleOptions(engine="vllm"))
    assert (opened.vision is not None) is sees_images and opened.engine.vision == opened.vision
    if sees_images:  # the server takes images and the engine expands them on the checkpoint's grid
        assert opened.vision == VisionSpec.from_checkpoint(model)
        assert opened.engine._image_pad == opened.tokenizer.special_id(IMAGE_PAD)
