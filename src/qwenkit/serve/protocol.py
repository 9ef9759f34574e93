"""The OpenAI wire format: request bodies the server accepts and the responses it sends (pydantic v2).

Contract: request fields are strict (no "1" for 1, no true for 1) and a wrong value of a known field is a 400
naming it. Unknown top-level fields are accepted and ignored, as vLLM does (clients such as LangChain and
LiteLLM send extras); they stay in `model_extra` for the handlers to name in a warning. Nested objects
(stream_options, response_format, tool_choice) still refuse unknown keys, so a typo there is a 400.
Qwen/vLLM extras (top_k, min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids,
include_stop_str_in_output, skip_special_tokens, chat_template_kwargs, thinking_budget, echo,
add_generation_prompt, continue_final_message) are ordinary fields; logit_bias keys stay strings here
(SamplingParams turns them into token ids). parse_request() refuses a body nested deeper than
MAX_JSON_DEPTH before any parsing, so depth cannot cost much. Messages and tools stay plain dicts here:
chat.messages validates them with its own one-line errors. Response models dump to the JSON OpenAI
clients parse; `Delta` and `AssistantMessage` leave out what they do not carry.
"""

from __future__ import annotations

import re
from itertools import accumulate
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from qwenkit.engines.sampling import MAX_LOGIT_BIAS
from qwenkit.serve.errors import APIError

MAX_NAME_CHARS = 256
MAX_JSON_DEPTH = 64  # arrays/objects inside one another; real requests (tools, schemas) stay far below
MAX_STOP_TOKEN_IDS = 64
_UNION_TAG = re.compile(r"^(?:[A-Z]\w*|str|int|float|bool|dict|list|function-\w+)(?:\[.*)?$|^literal\[")
INT64 = 2**63
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=False)
T = TypeVar("T", bound=BaseModel)


class _Request(BaseModel):
    model_config = _STRICT


class _Body(BaseModel):
    """A whole request body: unknown top-level fields are kept (model_extra), not refused."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False, populate_by_name=False)


# ---- requests -----------------------------------------------------------------------------------------


class StreamOptions(_Request):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted; chunks are never padded


class FunctionName(_Request):
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Request):
    name: str = Field(default="response", min_length=1, max_length=64)
    description: str | None = Field(default=None, max_length=4096)
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Sampling(_Body):
    """Fields /v1/chat/completions and /v1/completions share."""

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    # Token id (as a JSON object key, so a string) → bias; SamplingParams turns the keys into ids and checks.
    logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    response_format: ResponseFormat | None = None
    echo: bool | None = None
    # Qwen extras, accepted the way vLLM accepts them (extra body fields).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, max_length=MAX_STOP_TOKEN_IDS
    )
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0)
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_budget: int | None = Field(default=None, ge=1)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    # qwenkit: a prompt preset (chat/presets.py: built-in or `serve --presets FILE`) and its arguments.
    preset: str | None = Field(default=None, min_length=1, max_length=64)
    preset_args: dict[str, str | list[str]] | None = Field(default=None, max_length=16)
    verbosity: Literal["low", "medium", "high"] | None = None
    modalities: list[str] | None = Field(default=None, max_length=4)
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template: Any = None  # present only to refuse it with a reason (see handlers)
    # OpenAI bookkeeping fields clients send; they change nothing here.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = Field(default=None, max_length=32)
    prompt_cache_key: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    safety_identifier: str | None = Field(default=None, max_length=MAX_NAME_CHARS)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


def json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (0 for a scalar), in C-speed passes."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets), initial=0))


def parse_request(raw: bytes, model: type[T]) -> T:
    """The JSON body as `model`; APIError 400 for a body nested too deep or one that does not fit."""
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(raw) > MAX_JSON_DEPTH:
        raise APIError(
            400, f"the body nests arrays/objects more than {MAX_JSON_DEPTH} levels deep", code="too_deep"
        )
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        param, message = first_error(exc)
        raise APIError(400, message, param=param or None) from None


def first_error(exc: ValidationError) -> tuple[str, str]:
    """(param, message) of a ValidationError's first problem, without the offending input."""
    errors = exc.errors(include_input=False, include_url=False)
    # The deepest problem is the most specific one (a union reports every branch; the dict branch is deeper).
    err = max(errors, key=lambda e: len(e["loc"]))
    loc: list[str] = []
    for part in err["loc"]:
        if isinstance(part, str) and _UNION_TAG.match(part):
            continue  # union branches appear in loc as type names ("str", "list[str]", "NamedToolChoice")
        loc.append(str(part))
    param = ".".join(loc)
    if err["type"] == "extra_forbidden":
        return param, f"unknown field {param!r}"
    if err["type"] == "json_invalid":
        return "", f"body is not valid JSON: {str(err['msg']).removeprefix('Invalid JSON: ')}"
    if err["type"] in ("model_type", "model_attributes_type") and not param:
        return "", "the body must be a JSON object"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return param, f"{param}: {msg}" if param else msg


# ---- responses ----------------------------------------------------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FunctionCall(_Response):
    name: str
    arguments: str


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


def _drop_none(value: Any, handler: SerializerFunctionWrapHandler, keep: tuple[str, ...]) -> dict[str, Any]:
    data = handler(value)
    return {k: v for k, v in data.items() if v is not None or k in keep}


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the same text as reasoning_content, for clients of that convention
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        return _drop_none(self, handler, keep=("role", "content"))


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class CompletionTokensDetails(_Response):
    reasoning_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunction(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class Delta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        return _drop_none(self, handler, keep=())


class ChunkChoice(_Response):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qwenkit"
    max_model_len: int
    parent: str | None = None  # a LoRA adapter's base model (as vLLM lists adapters)
    input_modalities: list[str] | None = None  # ["text", "image"] when served with a vision projector


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
