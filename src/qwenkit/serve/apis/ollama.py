"""The Ollama API (/api/chat, /api/generate, /api/embed, /api/embeddings, /api/tags, /api/show, /api/version)
over the native path.

Contract: a chat or generate request becomes a native chat request (generate: `system` + `prompt` as one
user turn, rendered with the model's template; `raw` and `suffix` are refused) and runs on serve/handlers.py
like any chat. `think` true/false turns thinking on/off, "low"/"medium"/"high" map to reasoning_effort,
absent leaves the model's default; reasoning comes back in `message.thinking` (generate: `thinking`).
`tools` are OpenAI-style function tools (as Ollama takes them); calls come back whole, with arguments as an
object, in the last content chunk. `format` "json" or a JSON schema → the grammar. `options`: temperature,
top_k, top_p, min_p, seed, stop, num_predict (-1/-2: no cap), repeat_penalty, presence/frequency_penalty,
thinking_budget (a qwenkit extra);
num_ctx above the server's context is refused; load-time options are ignored (named in x-qwenkit-warning).
Streams are NDJSON (Ollama's default is to stream), each line a chunk, the last with done, done_reason and
the counts; errors are {"error": message} (serve/errors.py wire_of). pull/push/create/copy/delete are refused
with the qwenkit command that does the job. `images` (base64) become native image parts before the text,
read and capped by qwenkit.media like OpenAI's. A LoRA adapter is the model "name:adapter" (as on
/v1/models; handlers.adapter_of), listed by /api/tags with its base as parent_model, and named in answers.
/api/embed (`input` text or texts, `truncate` default true: a text over the context keeps its first tokens,
`dimensions`) and the legacy /api/embeddings (`prompt`, one vector) run on the native embedding path
(serve/apis/embeddings.py embed_request: batched with concurrent requests, L2-normalised); an empty input
answers no vectors, as Ollama's does; a chat model answers 400. /api/show reports the capabilities Ollama
reports: ["embedding"] for an embedding model, else completion, tools, thinking (and vision).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import qwenkit
from qwenkit.engines.request import TokenEvent
from qwenkit.serve.apis.embeddings import EmbeddingsRequest, embed_request
from qwenkit.serve.errors import APIError, header_safe
from qwenkit.serve.events import finish_reason
from qwenkit.serve.handlers import ChatParts, Plan, ServeContext, adapter_of, plan_chat, served_models
from qwenkit.serve.logs import RequestInfo
from qwenkit.serve.protocol import MAX_NAME_CHARS, ChatCompletionRequest, Usage, first_error

# Ollama option → native field (the sampling options it shares with the OpenAI body).
OPTION_FIELDS = {
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "thinking_budget": "thinking_budget",  # a qwenkit extra: tokens allowed inside <think>
}
REFUSED = {
    "/api/pull": "qwenkit downloads a model when you serve it: qwenkit serve --model Qwen/...",
    "/api/push": "qwenkit does not publish models",
    "/api/create": "use qwenkit convert (and qwenkit quantize), then qwenkit serve --model FILE.gguf",
    "/api/copy": "serve the model under another name with qwenkit serve --served-model-name NAME",
    "/api/delete": "qwenkit serves one model; stop the server to unload it",
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    stream: bool = True  # Ollama streams unless told not to
    think: bool | Literal["low", "medium", "high"] | None = None
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | int | str | None = None  # accepted: the model stays loaded while the server runs


class OllamaChatRequest(_Body):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(_Body):
    prompt: str | None = None
    system: str | None = None
    suffix: str | None = None
    raw: bool | None = None
    images: list[Any] | None = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)


class OllamaEmbedRequest(BaseModel):
    """/api/embed; unknown fields and load-time options are ignored (named in x-qwenkit-warning)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    input: str | list[str] | None = None
    truncate: bool | None = None  # Ollama truncates unless told not to
    dimensions: int | None = Field(default=None, ge=0)  # 0 or the full size: the whole vector
    options: dict[str, Any] | None = None
    keep_alive: float | int | str | None = None


class OllamaEmbeddingsRequest(BaseModel):
    """The legacy /api/embeddings: one `prompt`, one vector."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    prompt: str | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | int | str | None = None


class Line(BaseModel):
    """One Ollama object (a chunk or a whole answer) as it goes on the wire."""

    model_config = ConfigDict(extra="allow")


# ---- request → native request ------------------------------------------------------------------------


def _with_images(content: Any, images: Any, where: str) -> Any:
    """Ollama's `images` (base64 strings, no data: prefix) as native image_url parts before the text, as
    Ollama places them; qwenkit.media reads and checks them like any other image."""
    if not images:
        return content
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise APIError(400, f"{where}: images must be a list of base64 strings")
    # Ollama sends bare base64; the media code sniffs the real format from the bytes.
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": f"data:image/*;base64,{data}"}} for data in images
    ]
    if isinstance(content, str) and content:
        parts.append({"type": "text", "text": content})
    return parts


def _messages(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ollama messages → native ones: thinking → reasoning_content, tool_calls get ids, and a tool
    message answers the latest call of its tool_name (else the latest call)."""
    out: list[dict[str, Any]] = []
    calls: list[tuple[str, str]] = []  # (id, name) of the assistant calls so far
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where}: each message is an object with a role and content")
        role = message.get("role")
        native = {
            "role": role,
            "content": _with_images(message.get("content", ""), message.get("images"), where),
        }
        if role == "assistant":
            if message.get("thinking") is not None:
                native["reasoning_content"] = message["thinking"]
            tool_calls = []
            raw_calls = message.get("tool_calls") or []
            if not isinstance(raw_calls, list):
                raise APIError(400, f"{where}.tool_calls must be a list")
            for j, call in enumerate(raw_calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise APIError(400, f"{where}.tool_calls[{j}]: give function.name and function.arguments")
                args = function.get("arguments", {})
                if not isinstance(args, dict):
                    raise APIError(400, f"{where}.tool_calls[{j}].function.arguments must be an object")
                call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{i}_{j}"
                calls.append((call_id, function["name"]))
                arguments = json.dumps(args, ensure_ascii=False)
                tool_calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": function["name"], "arguments": arguments},
                    }
                )
            if tool_calls:
                native["tool_calls"] = tool_calls
        elif role == "tool":
            name = message.get("tool_name") or message.get("name")
            match = [c for c, n in calls if n == name] or [c for c, _ in calls]
            if not match:
                raise APIError(
                    400, f"{where}: a tool message answers a tool call; no assistant call came before"
                )
            native["tool_call_id"] = message.get("tool_call_id") or match[-1]
        out.append(native)
    return out


def _options(body: _Body, ctx: ServeContext) -> dict[str, Any]:
    native: dict[str, Any] = {}
    for name, value in (body.options or {}).items():
        if name in OPTION_FIELDS:
            native[OPTION_FIELDS[name]] = value
        elif name == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool) or value == 0 or value < -2:
                raise APIError(400, "options.num_predict: a positive number of tokens, or -1 for no cap")
            if value > 0:
                native["max_tokens"] = value
        elif name == "num_ctx":
            _check_num_ctx(ctx, value)
        else:  # load-time and unknown options: named in the warning header by the native path
            native[f"options.{name}"] = value
    return native


def _check_num_ctx(ctx: ServeContext, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value > ctx.engine.n_ctx:
        raise APIError(
            400,
            f"options.num_ctx: at most {ctx.engine.n_ctx} on this server "
            "(start it with a larger qwenkit serve --ctx)",
        )


def _native(ctx: ServeContext, body: _Body, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    native: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream}
    if isinstance(body.think, bool):
        native["chat_template_kwargs"] = {"enable_thinking": body.think}
    elif body.think is not None:
        native["reasoning_effort"] = body.think
    if body.format == "json":
        native["response_format"] = {"type": "json_object"}
    elif isinstance(body.format, dict):
        native["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "format", "schema": body.format},
        }
    if isinstance(body, OllamaChatRequest) and body.tools:
        native["tools"] = body.tools
    native |= _options(body, ctx)
    native |= {
        k: v for k, v in (body.model_extra or {}).items() if k not in ChatCompletionRequest.model_fields
    }
    try:
        return ChatCompletionRequest.model_validate(native)
    except ValidationError as exc:
        param, message = first_error(exc)
        raise APIError(400, message, param=param or None) from None


def plan_ollama(
    ctx: ServeContext, body: OllamaChatRequest | OllamaGenerateRequest, info: RequestInfo
) -> Plan:
    """Validate and plan /api/chat or /api/generate on the native path (blocking: a worker thread)."""
    if isinstance(body, OllamaGenerateRequest):
        if body.raw:
            raise APIError(
                400, "raw prompts are not supported; send the prompt without raw, or use /v1/completions"
            )
        if body.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported")
        system = [{"role": "system", "content": body.system}] if body.system else []
        messages = [
            *system,
            {"role": "user", "content": _with_images(body.prompt or "", body.images, "images")},
        ]
    else:
        messages = _messages(body.messages)
    kind: Literal["chat", "generate"] = "chat" if isinstance(body, OllamaChatRequest) else "generate"
    native = _native(ctx, body, messages)
    plan = plan_chat(ctx, native, info, job_factory=lambda parts: OllamaJob(parts, kind))
    return replace(plan, include_usage=True)  # the last line carries the counts


# ---- native events → Ollama lines ----------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class OllamaJob:
    """Parsed events → NDJSON lines (message.content / message.thinking, or response / thinking); tool
    calls are sent whole once generation ends; the non-stream answer is the lines added up."""

    media_type = "application/x-ndjson"

    def __init__(self, parts: ChatParts, kind: Literal["chat", "generate"]) -> None:
        self.ctx = parts.ctx
        self.model = parts.model  # "name:adapter" for a LoRA adapter, as asked
        self.parser = parts.parser()
        self.max_calls = parts.max_calls
        self.kind = kind
        self.content: list[str] = []
        self.thinking: list[str] = []
        self.calls: dict[int, dict[str, str]] = {}
        self.raw: list[str] = []
        self.done_reason: str | None = None
        self.started = time.perf_counter_ns()

    def _line(self, content: str, thinking: str, calls: list[dict[str, Any]] | None, **extra: Any) -> Line:
        if self.kind == "generate":
            fields: dict[str, Any] = {"response": content}
            if thinking:
                fields["thinking"] = thinking
        else:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            fields = {"message": message}
        return Line(model=self.model, created_at=_now(), **fields, **extra)

    def _whole_calls(self) -> list[dict[str, Any]]:
        out = []
        for index in sorted(self.calls):
            call = self.calls[index]
            try:
                args = json.loads(call["arguments"] or "{}")
            except json.JSONDecodeError:
                args = {}
            out.append(
                {"function": {"name": call["name"], "arguments": args if isinstance(args, dict) else {}}}
            )
        return out

    def start(self) -> list[BaseModel]:
        return []

    def on_event(self, index: int, event: TokenEvent) -> list[BaseModel]:
        self.raw.append(event.text)
        delta = self.parser.feed(event.text)
        if event.finished:
            delta = delta.then(self.parser.finish())
        for fragment in delta.tool_calls:
            if self.max_calls is not None and fragment.index >= self.max_calls:
                continue
            call = self.calls.setdefault(fragment.index, {"name": "", "arguments": ""})
            call["name"] += fragment.name or ""
            call["arguments"] += fragment.arguments
        self.content.append(delta.content)
        self.thinking.append(delta.reasoning)
        lines: list[BaseModel] = []
        if delta.content or delta.reasoning:
            lines.append(self._line(delta.content, delta.reasoning, None, done=False))
        if event.finished:
            finish = finish_reason(event, self.ctx.draining, bool(self.calls))
            self.done_reason = "length" if finish == "length" else "stop"
            if self.calls and self.kind == "chat":
                lines.append(self._line("", "", self._whole_calls(), done=False))
        return lines

    def _counts(self, usage: Usage) -> dict[str, Any]:
        total = time.perf_counter_ns() - self.started
        return {
            "done": True,
            "done_reason": self.done_reason,
            "total_duration": total,
            "load_duration": 0,
            "prompt_eval_count": usage.prompt_tokens,
            "eval_count": usage.completion_tokens,
        }

    def response(self, usage: Usage) -> BaseModel:
        calls = self._whole_calls() if self.kind == "chat" else None
        return self._line("".join(self.content), "".join(self.thinking), calls, **self._counts(usage))

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return self._line("", "", None, **self._counts(usage))

    def completion_text(self, index: int) -> str:
        return "".join(self.raw)

    def frame(self, item: BaseModel, include_usage: bool) -> str:
        return item.model_dump_json() + "\n"

    def done(self) -> str:
        return ""

    def error_frame(self, err: APIError) -> str:
        return json.dumps(err.body("ollama")) + "\n"


# ---- routes -------------------------------------------------------------------------------------------


def _details(ctx: ServeContext, model: str) -> dict[str, Any]:
    family = ctx.flavor.value if hasattr(ctx.flavor, "value") else str(ctx.flavor)
    return {
        "parent_model": "" if model == ctx.model_name else ctx.model_name,
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": "",
        "quantization_level": "",
    }


def _capabilities(ctx: ServeContext) -> list[str]:
    """What Ollama's /api/show reports: an embedding model only embeds."""
    if ctx.embedding is not None:
        return ["embedding"]
    return ["completion", "tools", "thinking", *(["vision"] if ctx.vision is not None else [])]


def check_model(ctx: ServeContext, name: str) -> None:
    """A 404 in Ollama's words for a model not served (the base, or "name:adapter")."""
    try:
        adapter_of(ctx, name)
    except APIError:
        served = " or ".join(repr(m) for m in served_models(ctx))
        raise APIError(
            404, f"model {name!r} not found; this server serves {served} (GET /api/tags)"
        ) from None


def _native_embeddings(
    ctx: ServeContext, model: str, texts: list[str], dimensions: int | None
) -> EmbeddingsRequest:
    if ctx.embedding is not None and dimensions is not None and dimensions >= ctx.embedding.dims:
        dimensions = None  # as Ollama: a size at or past the model's is the whole vector
    try:
        return EmbeddingsRequest.model_validate(
            {"model": model, "input": texts, "dimensions": dimensions or None}
        )
    except ValidationError as exc:
        param, message = first_error(exc)
        raise APIError(400, message, param=param or None) from None


def _ignored(options: dict[str, Any] | None, extra: dict[str, Any] | None) -> list[str]:
    names = sorted({*(f"options.{k}" for k in options or {} if k != "num_ctx"), *(extra or {})})
    return [f"ignored field(s): {', '.join(names[:10])}"] if names else []


def install(app: FastAPI, ctx: ServeContext) -> None:
    """Add the Ollama routes to an app made by create_app."""
    # app.py installs this module: import it late
    from qwenkit.serve.app import _info, parse_body, run_planned

    def plan_served(
        ctx: ServeContext, body: OllamaChatRequest | OllamaGenerateRequest, info: RequestInfo
    ) -> Plan:
        check_model(ctx, body.model)
        return plan_ollama(ctx, body, info)

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        return await run_planned(request, ctx, OllamaChatRequest, plan_served)

    @app.post("/api/generate")
    async def generate(request: Request) -> Response:
        return await run_planned(request, ctx, OllamaGenerateRequest, plan_served)

    async def embed_texts(
        request: Request,
        body: OllamaEmbedRequest | OllamaEmbeddingsRequest,
        texts: list[str],
        truncate: bool = False,
    ) -> tuple[list[list[float]], int, dict[str, str]]:
        """The native path's vectors for texts, the tokens embedded and the warning header."""
        check_model(ctx, body.model)
        if body.options and "num_ctx" in body.options:
            _check_num_ctx(ctx, body.options["num_ctx"])
        if not texts and ctx.embedding is not None:
            return [], 0, {}  # Ollama answers an empty input with no vectors (it loads the model)
        dims = body.dimensions if isinstance(body, OllamaEmbedRequest) else None
        native = _native_embeddings(ctx, body.model, texts, dims)
        done = await embed_request(ctx, native, _info(request), truncate)
        warning = header_safe(" | ".join([*done.warnings, *_ignored(body.options, body.model_extra)]))
        headers = {"x-qwenkit-warning": warning} if warning else {}
        return [v.tolist() for v in done.vectors], done.tokens, headers

    @app.post("/api/embed")
    async def embed(request: Request) -> JSONResponse:
        started = time.perf_counter_ns()
        body = await parse_body(request, OllamaEmbedRequest)
        texts = [body.input] if isinstance(body.input, str) else list(body.input or [])
        texts = [] if texts == [""] else texts  # Ollama: an empty string is no input
        truncate = body.truncate is not False
        vectors, tokens, headers = await embed_texts(request, body, texts, truncate)
        answer = {
            "model": body.model,
            "embeddings": vectors,
            "total_duration": time.perf_counter_ns() - started,
            "load_duration": 0,
            "prompt_eval_count": tokens,
        }
        return JSONResponse(answer, headers=headers)

    @app.post("/api/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        body = await parse_body(request, OllamaEmbeddingsRequest)
        vectors, _, headers = await embed_texts(request, body, [body.prompt] if body.prompt else [])
        return JSONResponse({"embedding": vectors[0] if vectors else []}, headers=headers)

    @app.get("/api/tags")
    async def tags() -> JSONResponse:
        modified = datetime.fromtimestamp(ctx.created, UTC).isoformat()
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": modified,
                "size": 0,
                "digest": "",
                "details": _details(ctx, name),
            }
            for name in served_models(ctx)
        ]
        return JSONResponse({"models": models})

    @app.post("/api/show")
    async def show(request: Request) -> JSONResponse:
        body = await parse_body(request, ShowRequest)
        check_model(ctx, body.model)
        details = _details(ctx, body.model)
        family = details["family"]
        info: dict[str, Any] = {"general.architecture": family, f"{family}.context_length": ctx.engine.n_ctx}
        if ctx.embedding is not None:
            info[f"{family}.embedding_length"] = ctx.embedding.dims
        return JSONResponse(
            {
                "modified_at": datetime.fromtimestamp(ctx.created, UTC).isoformat(),
                "details": details,
                "model_info": info,
                "capabilities": _capabilities(ctx),
                "template": "",
                "parameters": "",
            }
        )

    @app.get("/api/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": qwenkit.__version__})

    for path, advice in REFUSED.items():
        app.add_api_route(path, _refuser(path, advice), methods=["POST", "DELETE"], include_in_schema=False)


def _refuser(path: str, advice: str) -> Any:
    async def refused() -> JSONResponse:
        raise APIError(400, f"{path} is not available on qwenkit serve: {advice}")

    return refused
