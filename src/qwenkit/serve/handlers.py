"""The native request path: internal requests → GenerationRequests → engine events → a Job's answer.

Every API runs here (serve/apis/: OpenAI's jobs by default; Anthropic's translates its request into the
native chat request and passes its own job_factory), so limits, auth, tools, grammar, thinking, usage, logs
and metrics live once. The native request types are today's OpenAI-shaped protocol models.

Contract: plan_chat()/plan_completion() validate a parsed request against the ServeConfig caps and the
context, render and tokenize it (chat through chat.pipeline.prepare_chat, completions through encode_text —
special-token injection is impossible either way) and return a Plan, raising APIError for anything the client
must fix; a request's model is the served name or "name:adapter" for a LoRA adapter the engine loaded
(adapter_of(); anything else is a 404 naming what is served). respond() reserves a Plan's tokens (prompt +
max_tokens per choice) against the client's tokens/minute (429 when they do not fit), settles to the tokens
used when it ends, runs it on the engine (n choices concurrently, one engine request each, seeds seed, seed+1,
...) and answers JSON or a server-sent-event stream framed by the Job (its API's wire format). Both answers
come from the same per-event translation, so a stream's concatenated deltas equal the non-stream response. A
client that disconnects (noticed on the ASGI receive channel) has its engine requests aborted at once. Depends
only on the Engine protocol and the request types, never on a concrete engine. Planning is blocking CPU work:
the app runs it in a worker thread.

vLLM/OpenAI extras: ignore_eos drops the model's end tokens from the stop ids (stop_token_ids still stop);
stop_token_ids and logit_bias ids must lie in the tokenizer's vocabulary; min_tokens, logit_bias,
include_stop_str_in_output and skip_special_tokens go to SamplingParams. Chat: continue_final_message (or
add_generation_prompt false) continues the final assistant message; echo puts that message's content at the
start of the answer; parallel_tool_calls false keeps only the first tool call in every tool_choice mode (the
later ones are dropped, not turned into content). reasoning_effort "none"/"minimal" turns thinking off,
"low"/"medium"/"high" turn it on with thinking_budget 1024/4096/none (EFFORT_BUDGETS); an explicit
enable_thinking or thinking_budget wins. verbosity is accepted without effect; modalities other than
["text"] are refused. Image parts are read, checked and sized by qwenkit.media under the config's caps
(a model without a vision projector refuses them) and counted in the prompt at their image-token size.
Unknown top-level fields are ignored, named (ASCII-safe) in the x-qwenkit-warning
header and logged once; every header value built from client text goes through errors.header_safe().
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive

from qwenkit.chat.flavor import Flavor
from qwenkit.chat.messages import (
    ChatInputError,
    Message,
    image_parts,
    messages_from_openai,
    tools_from_openai,
)
from qwenkit.chat.parse import OutputParser
from qwenkit.chat.pipeline import prepare_chat
from qwenkit.chat.presets import BUILTIN as BUILTIN_PRESETS
from qwenkit.chat.presets import Preset, PresetError, apply_preset, find_preset
from qwenkit.checkpoints.embedding import EmbeddingSpec
from qwenkit.engines.arrivals import Arrival, Arrivals
from qwenkit.engines.base import Engine
from qwenkit.engines.grammar import json_object_grammar, unenforced_keywords
from qwenkit.engines.request import (
    EngineError,
    GenerationRequest,
    Grammar,
    GrammarError,
    ImageInput,
    TokenEvent,
)
from qwenkit.engines.sampling import SamplingError, resolve_sampling
from qwenkit.media import FetchPolicy, ImageLimits, MediaError, VisionSpec, image_tokens, load_images
from qwenkit.serve.apis.openai import ChatJob, CompletionJob
from qwenkit.serve.config import ServeConfig
from qwenkit.serve.errors import APIError, from_engine_error, header_safe, shutting_down
from qwenkit.serve.logprobs import TokenTexts
from qwenkit.serve.logs import RequestInfo, UserHasher
from qwenkit.serve.metrics import ServeMetrics
from qwenkit.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CompletionTokensDetails,
    NamedToolChoice,
    PromptTokensDetails,
    Usage,
)
from qwenkit.serve.security import RateLimiter, TokenReservation
from qwenkit.serve.tools import GrammarCache, ToolChoiceError, plan_tools
from qwenkit.tokenizer.specials import ENDOFTEXT, IM_END
from qwenkit.tokenizer.tokenizer import QwenTokenizer

# reasoning_effort here is a template variable (Qwen3.8's template reads it), passed as given.
CHAT_TEMPLATE_KWARGS = frozenset({"enable_thinking", "preserve_thinking", "reasoning_effort"})
# reasoning_effort → thinking budget (tokens inside <think>); "none"/"minimal" turn thinking off.
EFFORT_BUDGETS: dict[str, int | None] = {"low": 1024, "medium": 4096, "high": None}
MAX_NAMED_IGNORED = 10  # unknown fields named in the warning; the rest are counted
SEED_MODULUS = 2**32  # engines take 32-bit seeds; OpenAI clients send any int64
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
log = logging.getLogger("qwenkit.serve")


@dataclass
class ServeContext:
    """Everything the handlers share for one app: the model, the engine, the caps and the bookkeeping."""

    engine: Engine
    tokenizer: QwenTokenizer
    flavor: Flavor
    model_name: str
    config: ServeConfig
    metrics: ServeMetrics
    limiter: RateLimiter
    texts: TokenTexts
    grammars: GrammarCache = field(default_factory=GrammarCache)
    hash_user: UserHasher = field(default_factory=UserHasher)
    created: int = field(default_factory=lambda: int(time.time()))
    active: set[str] = field(default_factory=set)  # engine request ids in flight
    draining: bool = False
    presets: Mapping[str, Preset] = field(default_factory=lambda: BUILTIN_PRESETS)
    adapters: tuple[str, ...] = ()  # LoRA adapters the engine loaded; a request picks one as "model:name"
    vision: VisionSpec | None = None  # the model's image grid when it has a vision projector; None: text only
    embedding: EmbeddingSpec | None = (
        None  # an embedding model: /v1/embeddings only (serve/apis/embeddings.py)
    )
    arrivals: Arrivals = field(default_factory=Arrivals)  # generating requests not yet submitted

    def begin_drain(self) -> None:
        """Stop admitting requests (503); in-flight ones go on until abort_all()."""
        self.draining = True

    def abort_all(self) -> None:
        for request_id in list(self.active):
            self.engine.abort(request_id)


# ---- planning -----------------------------------------------------------------------------------------


class Job(Protocol):
    """Turns one request's engine events into chunks (streaming) and a final response (both from one path)."""

    def start(self) -> list[BaseModel]: ...

    def on_event(self, index: int, event: TokenEvent) -> list[BaseModel]: ...

    def response(self, usage: Usage) -> BaseModel: ...

    def usage_chunk(self, usage: Usage) -> BaseModel: ...

    def completion_text(self, index: int) -> str: ...

    # The wire format: its stream's media type, how each item is framed, how the stream ends, and how an
    # error mid-stream is sent.
    media_type: str

    def frame(self, item: BaseModel, include_usage: bool) -> str: ...

    def done(self) -> str: ...

    def error_frame(self, err: APIError) -> str: ...


@dataclass
class ChatParts:
    """What planning hands a chat job: every API's job renders the same parsed events its own way."""

    ctx: ServeContext
    response_id: str
    n: int
    parser: Callable[[], OutputParser]
    prompt_tokens: int
    request: GenerationRequest
    model: str  # the request's model: the served name, or "name:adapter" (each API's answers name it)
    max_calls: int | None = None
    echo: str | None = None


ChatJobFactory = Callable[[ChatParts], Job]


@dataclass
class Plan:
    requests: list[GenerationRequest]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    job: Job
    prompt_text: str
    warnings: list[str] = field(default_factory=list)


def refuse_if_embedding_model(ctx: ServeContext) -> None:
    """An embedding model generates nothing: every generating route (and batch line) answers 400."""
    if ctx.embedding is not None:
        raise APIError(
            400,
            f"{ctx.model_name} is an embedding model: it answers POST /v1/embeddings only; serve a chat "
            "model (e.g. `qwenkit serve --model Qwen/Qwen3-0.6B`) for this route",
            code="embedding_model",
        )


def _check_common(
    ctx: ServeContext, body: ChatCompletionRequest | CompletionRequest, info: RequestInfo
) -> list[str]:
    """Checks both endpoints share; returns the warnings they produce (ignored unknown fields)."""
    if ctx.draining:
        raise shutting_down()
    refuse_if_embedding_model(ctx)
    adapter_of(ctx, body.model)  # 404 for a model not served
    cfg = ctx.config
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > cfg.max_stop:
        raise APIError(400, f"stop: at most {cfg.max_stop} stop sequences", param="stop")
    if any(not s or len(s) > cfg.max_stop_chars for s in stops):
        raise APIError(
            400, f"stop: each stop sequence needs 1 to {cfg.max_stop_chars} characters", param="stop"
        )
    _check_token_ids(ctx, "stop_token_ids", body.stop_token_ids or ())
    info.model = body.model
    info.stream = bool(body.stream)
    if body.user:
        info.user = ctx.hash_user(body.user)
    return _ignored_fields(body, info)


def adapter_of(ctx: ServeContext, model: str) -> str | None:
    """The LoRA adapter a request's model names: the served name → None (the base model), "name:adapter" →
    that adapter; anything else is a 404 naming what is served."""
    if model == ctx.model_name:
        return None
    base, _, adapter = model.rpartition(":")
    if base == ctx.model_name and adapter in ctx.adapters:
        return adapter
    served = " or ".join(repr(m) for m in served_models(ctx))
    raise APIError(
        404,
        f"model {model!r} is not served here; use {served} (GET /v1/models)",
        param="model",
        code="model_not_found",
    )


def served_models(ctx: ServeContext) -> list[str]:
    """The model names requests may use: the base model, then each adapter as "name:adapter"."""
    return [ctx.model_name, *(f"{ctx.model_name}:{a}" for a in ctx.adapters)]


def _ignored_fields(body: ChatCompletionRequest | CompletionRequest, info: RequestInfo) -> list[str]:
    """A warning naming the unknown fields (ASCII-safe), also logged once; vLLM ignores them the same way."""
    extra = sorted(body.model_extra or {})
    if not extra:
        return []
    names = [header_safe(name, 40) or '""' for name in extra[:MAX_NAMED_IGNORED]]
    more = f" and {len(extra) - MAX_NAMED_IGNORED} more" if len(extra) > MAX_NAMED_IGNORED else ""
    warning = f"ignored unknown fields: {', '.join(names)}{more}"
    log.warning("request %s: %s", info.id, warning)
    return [warning]


def _check_token_ids(ctx: ServeContext, param: str, ids: Collection[int]) -> None:
    vocab = ctx.tokenizer.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise APIError(
            400, f"{param}: token id {bad} is outside the vocabulary (0 to {vocab - 1})", param=param
        )


def _stop_token_ids(
    model_stops: frozenset[int], body: ChatCompletionRequest | CompletionRequest
) -> frozenset[int]:
    """The model's end tokens (dropped with ignore_eos, as vLLM does) plus the client's stop_token_ids."""
    extra = frozenset(body.stop_token_ids or ())
    return extra if body.ignore_eos else model_stops | extra


def _check_min_tokens(body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None) -> None:
    if body.min_tokens and max_tokens is not None and body.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens: at most max_tokens ({max_tokens})", param="min_tokens")


def _check_n(cfg: ServeConfig, n: int) -> None:
    if n > cfg.max_n:
        raise APIError(400, f"n: at most {cfg.max_n} choices per request on this server", param="n")


def _sampling_fields(
    body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None
) -> dict[str, object]:
    return {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty,
        "seed": None if body.seed is None else body.seed % SEED_MODULUS,
        "stop": body.stop,
        "max_tokens": max_tokens,
        "min_tokens": body.min_tokens,
        "logit_bias": body.logit_bias,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "skip_special_tokens": body.skip_special_tokens,
    }


def _max_tokens(ctx: ServeContext, asked: int | None, prompt_tokens: int, param: str) -> int | None:
    """The max_tokens to run with, or APIError when the prompt and the request do not fit."""
    n_ctx = ctx.engine.n_ctx
    cap = ctx.config.max_tokens
    if asked is not None and cap is not None and asked > cap:
        raise APIError(400, f"max_tokens: at most {cap} on this server", param="max_tokens")
    room = n_ctx - prompt_tokens
    if room < 1 or (asked is not None and asked > room):
        raise APIError(
            400,
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({asked or 1}) exceeds the context "
            f"({n_ctx} tokens); shorten the {param} or lower max_tokens",
            param=param if room < 1 else "max_tokens",
            code="context_length_exceeded",
            reason="too_long",
        )
    if asked is None and cap is not None:
        return min(cap, room)
    return asked


def _fan_out(request: GenerationRequest, n: int, index0: int, base_id: str) -> list[GenerationRequest]:
    """n engine requests for one prompt: seeds seed, seed+1, ... so choices differ but stay reproducible."""
    out = []
    for j in range(n):
        sampling = request.sampling
        if sampling.seed is not None and j:
            sampling = sampling.model_copy(update={"seed": (sampling.seed + j) % SEED_MODULUS})
        out.append(replace(request, request_id=f"{base_id}-{index0 + j}", sampling=sampling))
    return out


_EFFORT_WORD = re.compile(r"[a-z_-]{1,16}")


def _template_switches(kwargs: Mapping[str, Any] | None) -> tuple[bool | None, bool | None, str | None]:
    """(enable_thinking, preserve_thinking, reasoning_effort) from chat_template_kwargs; None if not given."""
    if not kwargs:
        return None, None, None
    unknown = sorted(set(kwargs) - CHAT_TEMPLATE_KWARGS)
    if unknown:
        raise APIError(
            400,
            f"chat_template_kwargs: unknown key {unknown[0]!r}; "
            f"only {', '.join(sorted(CHAT_TEMPLATE_KWARGS))} are accepted",
            param="chat_template_kwargs",
        )
    values = []
    for key in ("enable_thinking", "preserve_thinking"):
        value = kwargs.get(key)
        if value is not None and not isinstance(value, bool):
            raise APIError(
                400, f"chat_template_kwargs.{key} must be true or false", param="chat_template_kwargs"
            )
        values.append(value)
    effort = kwargs.get("reasoning_effort")
    if effort is not None and not (isinstance(effort, str) and _EFFORT_WORD.fullmatch(effort)):
        raise APIError(
            400,
            'chat_template_kwargs.reasoning_effort must be a word like "low" or "xhigh"',
            param="chat_template_kwargs",
        )
    return values[0], values[1], effort


def _response_grammar(
    ctx: ServeContext, body: ChatCompletionRequest | CompletionRequest, warnings: list[str]
) -> Grammar | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    try:
        if fmt.type == "json_object" or fmt.json_schema is None or fmt.json_schema.json_schema is None:
            if fmt.type == "json_schema" and fmt.json_schema is None:
                raise APIError(
                    400, "response_format: json_schema needs a 'json_schema' object", param="response_format"
                )
            return ctx.grammars.get("json_object", json_object_grammar)
        schema = fmt.json_schema.json_schema
        grammar = ctx.grammars.json_schema(schema)
        _warn_unenforced("response_format: the answer", [schema], warnings)
        return grammar
    except GrammarError as exc:
        raise APIError(
            400, f"response_format: {exc}", param="response_format", code="invalid_schema"
        ) from None


def _warn_unenforced(what: str, schemas: list[Mapping[str, Any]], warnings: list[str]) -> None:
    """Name the keywords of constraining schemas that the grammar cannot enforce (as a warning)."""
    unenforced = sorted({keyword for schema in schemas for keyword in unenforced_keywords(schema)})
    if unenforced:
        warnings.append(
            f"{what} follows the schema's structure, but these keywords are not enforced while generating: "
            f"{', '.join(unenforced)}"
        )


def _thinking(
    body: ChatCompletionRequest, enable_thinking: bool | None, warnings: list[str]
) -> tuple[bool | None, int | None]:
    """(enable_thinking, thinking_budget) once reasoning_effort is mapped (see EFFORT_BUDGETS): an explicit
    enable_thinking or thinking_budget wins over what the effort implies."""
    effort, budget = body.reasoning_effort, body.thinking_budget
    if effort is None:
        return enable_thinking, budget
    wants = effort in EFFORT_BUDGETS
    if enable_thinking is not None and enable_thinking != wants:
        warnings.append(
            f"reasoning_effort {effort!r} was ignored: "
            f"chat_template_kwargs.enable_thinking is {str(enable_thinking).lower()}"
        )
        return enable_thinking, budget
    return wants, budget if budget is not None or not wants else EFFORT_BUDGETS[effort]


def _continues(body: ChatCompletionRequest, messages: list[Message]) -> bool:
    """Whether the final assistant message is continued (prefill): continue_final_message, or
    add_generation_prompt false (which, with no new turn to start, means the same here)."""
    if body.continue_final_message:
        if body.add_generation_prompt:
            raise APIError(
                400,
                "continue_final_message and add_generation_prompt cannot both be true; "
                "set add_generation_prompt to false (or leave it out)",
                param="add_generation_prompt",
            )
        return True
    if body.add_generation_prompt is False:
        if messages[-1].role != "assistant":
            raise APIError(
                400,
                "add_generation_prompt: false continues the final assistant message; end the messages with "
                "the assistant text to continue, or leave add_generation_prompt out",
                param="add_generation_prompt",
            )
        return True
    return False


def _tools(ctx: ServeContext, body: ChatCompletionRequest) -> tuple[list[Any], str | None, str | None]:
    cfg = ctx.config
    raw = body.tools or []
    if len(raw) > cfg.max_tools:
        raise APIError(400, f"tools: at most {cfg.max_tools} tools per request", param="tools")
    for i, tool in enumerate(raw):
        if len(json.dumps(tool, ensure_ascii=False).encode()) > cfg.max_tool_bytes:
            raise APIError(400, f"tools[{i}]: larger than {cfg.max_tool_bytes} bytes as JSON", param="tools")
    try:
        tools = tools_from_openai(raw)
    except ChatInputError as exc:
        raise APIError(400, str(exc), param="tools") from None
    if len({t.name for t in tools}) != len(tools):
        raise APIError(400, "tools: two tools share a name; give each function a unique name", param="tools")
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        return tools, "named", choice.function.name
    return tools, choice, None


def _with_preset(ctx: ServeContext, body: ChatCompletionRequest) -> ChatCompletionRequest:
    """The request with its preset's system prompt and sampling defaults applied (the request's own values
    win), as plain messages for the normal renderer; a preset's enable_thinking unless the request set it."""
    if body.preset is None:
        if body.preset_args:
            raise APIError(400, "preset_args needs a preset", param="preset_args")
        return body
    try:
        preset = find_preset(body.preset, ctx.presets)
        fields = ChatCompletionRequest.model_fields
        own = {key: getattr(body, key) for key in preset.sampling if key in fields}
        messages, sampling = apply_preset(preset, body.messages, own, body.preset_args)
    except PresetError as exc:
        raise APIError(400, str(exc), param="preset") from None
    update: dict[str, Any] = {"messages": messages, **{k: v for k, v in sampling.items() if k in own}}
    kwargs = dict(body.chat_template_kwargs or {})
    unset = kwargs.get("enable_thinking") is None and body.reasoning_effort is None
    if preset.enable_thinking is not None and unset:
        update["chat_template_kwargs"] = {**kwargs, "enable_thinking": preset.enable_thinking}
    return body.model_copy(update=update)


def _images(ctx: ServeContext, messages: list[Message]) -> tuple[list[ImageInput], int]:
    """The request's images read, checked and sized (in prompt order), and the prompt tokens they add beyond
    their one placeholder each; APIError naming the cap or the fix. Runs off the event loop (planning)."""
    parts = image_parts(messages)
    if not parts:
        return [], 0
    if ctx.vision is None:
        raise APIError(
            400,
            f"this model has no vision projector: {ctx.model_name} reads text only; send text, or serve a "
            "vision model with its projector (qwenkit serve --mmproj FILE)",
            param="messages",
            code="images_not_supported",
        )
    cfg = ctx.config
    try:
        images = load_images(
            [p.url for p in parts],
            ctx.vision,
            ImageLimits(cfg.max_image_bytes, cfg.max_image_pixels),
            FetchPolicy(cfg.allow_remote_media, cfg.max_image_bytes),
            cfg.max_images,
        )
    except MediaError as exc:
        raise APIError(400, str(exc), param="messages", code=exc.code) from None
    return images, sum(image_tokens(image.pixels, ctx.vision) - 1 for image in images)


def plan_chat(
    ctx: ServeContext,
    body: ChatCompletionRequest,
    info: RequestInfo,
    job_factory: ChatJobFactory | None = None,
) -> Plan:
    """Validate and prepare a chat completion; APIError for anything the client must fix. job_factory: the
    API whose answer it is (default OpenAI chat); every API's chat request is planned here, once."""
    body = _with_preset(ctx, body)
    warnings = _check_common(ctx, body, info)
    cfg = ctx.config
    if body.chat_template is not None:
        raise APIError(
            400,
            "chat_template is refused: this server renders every prompt with the model's own template "
            "(a request-supplied template could emit any special token)",
            param="chat_template",
        )
    if len(body.messages) > cfg.max_messages:
        raise APIError(400, f"messages: at most {cfg.max_messages} messages per request", param="messages")
    n = body.n or 1
    _check_n(cfg, n)
    top = 0
    if body.top_logprobs is not None:
        if body.top_logprobs > cfg.max_top_logprobs:
            raise APIError(400, f"top_logprobs: at most {cfg.max_top_logprobs}", param="top_logprobs")
        if not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        top = body.top_logprobs
    if body.modalities and any(m != "text" for m in body.modalities):
        raise APIError(
            400, 'modalities: this server answers with text only; use ["text"]', param="modalities"
        )
    if body.verbosity is not None:
        warnings.append("verbosity has no effect on this server")
    enable_thinking, preserve_thinking, effort_word = _template_switches(body.chat_template_kwargs)
    enable_thinking, thinking_budget = _thinking(body, enable_thinking, warnings)
    try:
        messages = messages_from_openai(body.messages)
    except ChatInputError as exc:
        raise APIError(400, str(exc), param="messages") from None
    images, image_extra = _images(ctx, messages)
    continues = _continues(body, messages)
    # vLLM's chat echo: the final assistant message (the prefill) opens the answer.
    echo = (messages[-1].content or "") if body.echo and messages[-1].role == "assistant" else None
    tools, choice, named = _tools(ctx, body)
    try:
        tool_plan = plan_tools(tools, choice, named, body.parallel_tool_calls is not False, ctx.grammars)
    except ToolChoiceError as exc:
        raise APIError(400, f"tool_choice: {exc}", param="tool_choice") from None
    except GrammarError as exc:
        raise APIError(400, str(exc), param="tools", code="invalid_schema") from None
    if tool_plan.grammar is not None:  # a forced call: its arguments are generated under the grammar
        forced = [t.parameters or {} for t in tools if t.name in tool_plan.names]
        _warn_unenforced("tools: the call's arguments", forced, warnings)
    max_calls = None
    if body.parallel_tool_calls is False:
        max_calls = 1  # forced modes' grammars already allow one call; "auto" drops the later ones
        if tool_plan.mode == "auto":
            warnings.append("parallel_tool_calls is false: only the first tool call is returned")
    answer_grammar = _response_grammar(ctx, body, warnings)
    if answer_grammar is not None and tool_plan.grammar is not None:
        raise APIError(
            400,
            "response_format json cannot be combined with tool_choice required or a named function",
            param="response_format",
        )
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    sampling = {**_sampling_fields(body, None), "thinking_budget": thinking_budget}
    response_id = f"chatcmpl-{info.id}"
    try:
        prepared = prepare_chat(
            ctx.tokenizer,
            messages,
            flavor=ctx.flavor,
            tools=tool_plan.render or None,
            enable_thinking=enable_thinking,
            sampling=sampling,
            grammar=tool_plan.grammar or answer_grammar,
            logprobs=top if body.logprobs else None,
            request_id=response_id,
            continue_final_message=continues,
            preserve_thinking=preserve_thinking,
            reasoning_effort=effort_word or body.reasoning_effort,  # for a template that reads it
            images=images,
        )
    except (ChatInputError, SamplingError) as exc:
        message = str(exc)
        param = "continue_final_message" if message.startswith("continue_final_message") else None
        raise APIError(400, message, param=param or _param_of(message)) from None
    # Each image's placeholder becomes its image tokens in the engine: they count against the context.
    prompt_tokens = len(prepared.request.prompt_token_ids) + image_extra
    max_tokens = _max_tokens(ctx, asked, prompt_tokens, "messages")
    _check_min_tokens(body, max_tokens)
    request = prepared.request
    _check_token_ids(ctx, "logit_bias", request.sampling.logit_bias)
    request = replace(
        request,
        stop_token_ids=_stop_token_ids(request.stop_token_ids, body),
        ignore_eos=bool(body.ignore_eos),
        adapter=adapter_of(ctx, body.model),
    )
    if max_tokens is not None:
        request = replace(request, sampling=request.sampling.model_copy(update={"max_tokens": max_tokens}))
    parts = ChatParts(
        ctx,
        response_id,
        n,
        # Only offered functions become calls ("none" offers none); any other call stays the model's text.
        parser=lambda: prepared.parser(call_names=tool_plan.names),
        prompt_tokens=prompt_tokens,
        request=request,
        model=body.model,
        max_calls=max_calls,
        echo=echo,
    )
    if job_factory is not None:
        job = job_factory(parts)
    else:
        job = ChatJob(
            ctx,
            response_id,
            n,
            parser=parts.parser,
            logprobs=bool(body.logprobs),
            top=top,
            include_usage=_include_usage(body),
            echo=echo,
            max_calls=max_calls,
        )
        job.model = body.model  # a LoRA adapter's answers name it, as vLLM's do
    info.n = n
    return Plan(
        requests=_fan_out(request, n, 0, response_id),
        prompt_tokens=prompt_tokens,
        stream=bool(body.stream),
        include_usage=_include_usage(body),
        job=job,
        prompt_text=prepared.prompt.text,
        warnings=[*warnings, *prepared.warnings],
    )


def _include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream and body.stream_options and body.stream_options.include_usage)


def _param_of(message: str) -> str | None:
    head = message.split(":", 1)[0]
    return head if head and " " not in head else None


def plan_completion(ctx: ServeContext, body: CompletionRequest, info: RequestInfo) -> Plan:
    """Validate and prepare a legacy text completion; the prompt is text, tokenized without special tokens."""
    warnings = _check_common(ctx, body, info)
    cfg = ctx.config
    n = body.n or 1
    if body.suffix:
        raise APIError(400, "suffix is not supported; put the text in the prompt", param="suffix")
    if body.best_of is not None and body.best_of != n:
        raise APIError(400, "best_of is not supported (other than best_of = n)", param="best_of")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported (no prompt log-probabilities)", param="echo")
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise APIError(400, "prompt: give a string or a non-empty list of strings", param="prompt")
    if len(prompts) * n > cfg.max_n:
        raise APIError(400, f"prompts × n: at most {cfg.max_n} choices per request on this server", param="n")
    if body.logprobs is not None and body.logprobs > cfg.max_top_logprobs:
        raise APIError(400, f"logprobs: at most {cfg.max_top_logprobs}", param="logprobs")
    encoded = [ctx.tokenizer.encode_text(p) for p in prompts]
    if any(not ids for ids in encoded):
        raise APIError(400, "prompt: empty prompt; give at least one character", param="prompt")
    longest = max(len(ids) for ids in encoded)
    max_tokens = _max_tokens(ctx, body.max_tokens, longest, "prompt")
    _check_min_tokens(body, max_tokens)
    try:
        sampling, sampling_warnings = resolve_sampling(_sampling_fields(body, max_tokens), thinking=False)
    except SamplingError as exc:
        raise APIError(400, str(exc), param=_param_of(str(exc))) from None
    _check_token_ids(ctx, "logit_bias", sampling.logit_bias)
    grammar = _response_grammar(ctx, body, warnings)
    response_id = f"cmpl-{info.id}"
    model_stops = frozenset({ctx.tokenizer.eos_token_id, *_special_ids(ctx.tokenizer, (ENDOFTEXT, IM_END))})
    stop_ids = _stop_token_ids(model_stops, body)
    requests: list[GenerationRequest] = []
    for i, ids in enumerate(encoded):
        base = GenerationRequest(
            request_id=response_id,
            prompt_token_ids=tuple(ids),
            sampling=sampling,
            stop_token_ids=stop_ids,
            ignore_eos=bool(body.ignore_eos),
            grammar=grammar,
            logprobs=body.logprobs,
            adapter=adapter_of(ctx, body.model),
        )
        requests += _fan_out(base, n, i * n, response_id)
    echo = [prompts[i // n] for i in range(len(requests))] if body.echo else None
    info.n = len(requests)
    job = CompletionJob(ctx, response_id, len(requests), body.logprobs, echo, _include_usage(body))
    job.model = body.model
    return Plan(
        requests=requests,
        prompt_tokens=sum(len(ids) for ids in encoded),
        stream=bool(body.stream),
        include_usage=_include_usage(body),
        job=job,
        prompt_text="\n".join(prompts),
        warnings=[*warnings, *sampling_warnings],
    )


def _special_ids(tokenizer: QwenTokenizer, tokens: tuple[str, ...]) -> list[int]:
    ids = []
    for token in tokens:
        with contextlib.suppress(ValueError):
            ids.append(tokenizer.special_id(token))
    return ids


# ---- running on the engine --------------------------------------------------------------------------------


class ClientGone(Exception):
    """The client disconnected; its engine requests were aborted."""


_DISCONNECTED = object()


async def _engine_events(
    ctx: ServeContext, requests: list[GenerationRequest], receive: Receive | None, arrival: Arrival | None
) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) from all requests as they arrive. Leaving early aborts every unfinished one.
    arrival (the request's place in ctx.arrivals) is left right before the first submit."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    finished = [False] * len(requests)

    async def pump(index: int, request: GenerationRequest) -> None:
        ctx.active.add(request.request_id)
        if arrival is not None:
            arrival.leave()
        events = ctx.engine.generate(request)
        try:
            async for event in events:
                queue.put_nowait((index, event))
        except Exception as exc:  # raised at submit (EngineError) or an engine bug: reported, not lost
            queue.put_nowait((index, exc))
        finally:
            ctx.active.discard(request.request_id)
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def watch() -> None:
        assert receive is not None
        while (await receive())["type"] != "http.disconnect":
            pass
        queue.put_nowait(_DISCONNECTED)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    if receive is not None:
        tasks.append(asyncio.create_task(watch()))
    try:
        while not all(finished):
            item = await queue.get()
            if item is _DISCONNECTED:
                raise ClientGone
            index, event = item
            if isinstance(event, EngineError):
                raise from_engine_error(event)
            if isinstance(event, Exception):
                raise APIError(500, f"engine error: {event}", code="engine_error") from event
            finished[index] = event.finished
            yield index, event
    finally:
        # Abort at once (not when the tasks get to run): the slot is freed within one engine step.
        for request, done in zip(requests, finished, strict=True):
            if not done:
                ctx.engine.abort(request.request_id)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


def _reserved_tokens(ctx: ServeContext, plan: Plan) -> int:
    """The most tokens a plan can use: its prompt plus every choice's max_tokens (None: the context left)."""
    answers = sum(r.sampling.max_tokens or ctx.engine.n_ctx - len(r.prompt_token_ids) for r in plan.requests)
    return plan.prompt_tokens + answers


class _Tally:
    """Usage, timings and metrics of one request as its events go by."""

    def __init__(
        self, ctx: ServeContext, plan: Plan, info: RequestInfo, start: float, reservation: TokenReservation
    ) -> None:
        self.ctx, self.plan, self.info, self.start = ctx, plan, info, start
        self.reservation = reservation
        self.last: dict[int, float] = {}
        self.completion = 0
        self.cached = 0
        self.final: dict[int, TokenEvent] = {}
        self.charged = False

    def see(self, index: int, event: TokenEvent) -> None:
        now = time.perf_counter()
        metrics = self.ctx.metrics
        if event.token_ids:
            if self.info.ttft_ms is None:
                self.info.ttft_ms = round((now - self.start) * 1000, 2)
                metrics.ttft.observe(now - self.start)
            previous = self.last.get(index)
            if previous is not None:
                metrics.itl.observe(now - previous)
            self.last[index] = now
            self.completion += len(event.token_ids)
        if event.finished:
            self.final[index] = event
            self.cached = max(self.cached, event.cached_tokens)
            metrics.prompt_tokens.inc(event.prompt_tokens)
            metrics.cached_prompt_tokens.inc(event.cached_tokens)
            metrics.generated_tokens.inc(event.completion_tokens)

    def usage(self) -> Usage:
        completion = sum(e.completion_tokens for e in self.final.values()) if self.final else self.completion
        reasoning = sum(e.reasoning_tokens for e in self.final.values())
        return Usage(
            prompt_tokens=self.plan.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.plan.prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached),
            completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning),
        )

    def close(self) -> None:
        """Record what was used (also for failed or abandoned requests)."""
        if self.charged:
            return
        self.charged = True
        info, job = self.info, self.plan.job
        info.completion_tokens = self.completion
        info.cached_tokens = self.cached
        info.finish_reasons = [self.final[i].finish_reason or "" for i in sorted(self.final)]
        self.reservation.settle(self.plan.prompt_tokens + self.completion)  # the unused rest goes back
        if self.ctx.config.log_content:
            info.completion = [job.completion_text(i) for i in range(len(self.plan.requests))]


async def respond(
    ctx: ServeContext, plan: Plan, info: RequestInfo, receive: Receive | None, arrival: Arrival | None = None
) -> JSONResponse | StreamingResponse:
    """Run a plan: a JSON response, or a stream once every choice has its first event. arrival: see
    _engine_events."""
    start = time.perf_counter()
    info.prompt_tokens = plan.prompt_tokens
    info.warnings = plan.warnings
    if ctx.config.log_content:
        info.prompt = plan.prompt_text
    # Tokens are held at admission (429 when they do not fit the client's tokens/minute), settled at the end.
    reservation = ctx.limiter.reserve_tokens(info.rate_key, _reserved_tokens(ctx, plan))
    tally = _Tally(ctx, plan, info, start, reservation)
    warning = header_safe(" | ".join(plan.warnings))  # warnings quote client text (schema values, names)
    headers = {"x-qwenkit-warning": warning} if warning else {}
    events = _engine_events(ctx, plan.requests, receive, arrival)
    head: list[tuple[int, TokenEvent]] = []
    streaming = False
    try:
        if plan.stream:
            # Wait for each choice's first event so that submit errors (503, 400) are still HTTP statuses.
            seen: set[int] = set()
            while len(seen) < len(plan.requests):
                index, event = await events.__anext__()
                head.append((index, event))
                seen.add(index)
            response = StreamingResponse(
                _stream(plan, tally, head, events),
                media_type=plan.job.media_type,
                headers={**SSE_HEADERS, **headers},
            )
            streaming = True  # only now does _stream own the cleanup: if anything above raised, we do
            return response
        plan.job.start()
        async for index, event in events:
            tally.see(index, event)
            plan.job.on_event(index, event)  # the chunks a stream would send; the job adds them up
        return JSONResponse(plan.job.response(tally.usage()).model_dump(mode="json"), headers=headers)
    except ClientGone:
        info.disconnected = True
        raise APIError(499, "client closed the request", reason="disconnected") from None
    finally:
        if not streaming:
            await events.aclose()
            tally.close()


async def _stream(
    plan: Plan,
    tally: _Tally,
    head: list[tuple[int, TokenEvent]],
    events: AsyncIterator[tuple[int, TokenEvent]],
) -> AsyncIterator[str]:
    job, usage_on = plan.job, plan.include_usage
    try:
        for chunk in job.start():
            yield job.frame(chunk, usage_on)
        for index, event in head:
            tally.see(index, event)
            for chunk in job.on_event(index, event):
                yield job.frame(chunk, usage_on)
        async for index, event in events:
            tally.see(index, event)
            for chunk in job.on_event(index, event):
                yield job.frame(chunk, usage_on)
        if usage_on:
            yield job.frame(job.usage_chunk(tally.usage()), True)
        yield job.done()
    except APIError as err:
        tally.info.rejected, tally.info.error_type = err.reason, err.type
        yield job.error_frame(err)
    except ClientGone:
        tally.info.disconnected = True
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
        tally.close()
