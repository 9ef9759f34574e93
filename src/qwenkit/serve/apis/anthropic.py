"""The Anthropic Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) over the native path.

Contract: a Messages request becomes a native chat request (system → a system message; text, thinking,
tool_use and tool_result blocks → messages, reasoning and tool calls; tools → function tools; tool_choice
auto/any/tool/none → auto/required/named/none, disable_parallel_tool_use → parallel_tool_calls false;
stop_sequences → stop; a final assistant message is continued, as Anthropic's prefill) and is planned and
run by serve/handlers.py like any chat request. Thinking follows Anthropic's rule: off unless `thinking:
{type: enabled, budget_tokens}` (budget → the thinking budget, below max_tokens), `adaptive` /
`between_tools`, or output_config.effort (→ reasoning_effort; xhigh/max → high); display "omitted" sends
thinking blocks empty. output_config.format (a JSON schema) → the answer's grammar. The parsed events come
back as content blocks (thinking, text, tool_use), streamed with Anthropic's event names (message_start,
ping, content_block_start/delta/stop, message_delta with stop_reason and usage, message_stop); the
non-stream message is the same blocks added up. Errors use Anthropic's shape (serve/errors.py wire_of).
count_tokens answers the rendered prompt's token count. Image blocks (base64 or url source) become native
image parts, read and capped by qwenkit.media like OpenAI's; documents and server tools are refused with a
400 that says so.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from qwenkit.chat.parse import ParseDelta
from qwenkit.engines.request import TokenEvent
from qwenkit.serve.errors import APIError
from qwenkit.serve.events import finish_reason, merged_fragments
from qwenkit.serve.handlers import ChatParts, Plan, ServeContext, plan_chat
from qwenkit.serve.logs import RequestInfo
from qwenkit.serve.protocol import MAX_NAME_CHARS, ChatCompletionRequest, Usage, first_error

# Engine/OpenAI finish reasons → Anthropic stop reasons ("stop" is end_turn or stop_sequence, see below).
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "stop": "end_turn"}
_NATIVE_FIELDS = frozenset(ChatCompletionRequest.model_fields)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ThinkingConfig(_Strict):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(default=None, ge=1)
    display: Literal["summarized", "omitted"] | None = None


class OutputFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Strict):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class ToolChoice(_Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_CHARS)
    disable_parallel_tool_use: bool | None = None


class CountTokensRequest(BaseModel):
    """The body of /v1/messages/count_tokens; unknown top-level fields are kept (and named in a warning)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(CountTokensRequest):
    """The body of /v1/messages."""

    max_tokens: int = Field(ge=1)
    stream: bool | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: dict[str, Any] | None = None


class Item(BaseModel):
    """One Anthropic object (a message, or a stream event named by its `type`) as it goes on the wire."""

    model_config = ConfigDict(extra="allow")
    type: str


# ---- request → native request ------------------------------------------------------------------------


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """Content as a list of blocks (a string is one text block); each must be an object with a type."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise APIError(400, f"{where}: content must be a string or a list of content blocks")
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise APIError(400, f"{where}.content[{i}]: each content block is an object with a 'type'")
    return content


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise APIError(400, f"{where}: a text block needs 'text' as a string")
    return text


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    """An image block as the native image_url part (base64 → a data: URL; url → the URL, under the
    server's remote-media rules); qwenkit.media reads and checks it like any other image."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str):  # type: ignore[union-attr]
        url = f"data:{source['media_type']};base64,{source['data']}"  # type: ignore[index]
    elif kind == "url" and isinstance(source.get("url"), str):  # type: ignore[union-attr]
        url = source["url"]  # type: ignore[index]
    else:
        raise APIError(
            400, f"{where}: an image block needs a source {{'type': 'base64', 'media_type', 'data'}} or a url"
        )
    return {"type": "image_url", "image_url": {"url": url}}


def _refuse_block(kind: str, where: str) -> APIError:
    if kind in ("document", "search_result"):
        return APIError(400, f"{where}: {kind} blocks are not supported; this server reads text only")
    return APIError(400, f"{where}: unknown content block type {kind!r}")


def _tool_result_text(block: dict[str, Any], where: str) -> str:
    content = block.get("content", "")
    parts = []
    for i, inner in enumerate(_blocks(content, where)):
        if inner["type"] != "text":
            raise _refuse_block(inner["type"], f"{where}.content[{i}]")
        parts.append(_text(inner, f"{where}.content[{i}]"))
    return "\n".join(parts)


def _user_messages(blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """A user turn: its tool_result blocks become tool messages, its text one user message after them."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    parts: list[dict[str, Any]] = []  # text and images in order, used when the turn has an image
    for i, block in enumerate(blocks):
        at = f"{where}.content[{i}]"
        if block["type"] == "text":
            texts.append(_text(block, at))
            parts.append({"type": "text", "text": texts[-1]})
        elif block["type"] == "image":
            parts.append(_image_part(block, at))
        elif block["type"] == "tool_result":
            call_id = block.get("tool_use_id")
            if not isinstance(call_id, str) or not call_id:
                raise APIError(400, f"{at}: a tool_result block needs 'tool_use_id' as a string")
            out.append({"role": "tool", "tool_call_id": call_id, "content": _tool_result_text(block, at)})
        else:
            raise _refuse_block(block["type"], at)
    if len(parts) > len(texts):
        out.append({"role": "user", "content": parts})
    elif texts:
        out.append({"role": "user", "content": "\n\n".join(texts)})
    if not out:
        raise APIError(400, f"{where}: the message has no content; give text or tool_result blocks")
    return out


def _assistant_message(blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for i, block in enumerate(blocks):
        at = f"{where}.content[{i}]"
        kind = block["type"]
        if kind == "text":
            texts.append(_text(block, at))
        elif kind == "thinking":
            if not isinstance(block.get("thinking"), str):
                raise APIError(400, f"{at}: a thinking block needs 'thinking' as a string")
            thinking.append(block["thinking"])
        elif kind == "redacted_thinking":
            continue  # encrypted by another provider: nothing to show the model
        elif kind == "tool_use":
            call_id, name, args = block.get("id"), block.get("name"), block.get("input", {})
            if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(args, dict):
                raise APIError(
                    400, f"{at}: a tool_use block needs 'id' and 'name' as strings and 'input' as an object"
                )
            function = {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}
            calls.append({"id": call_id, "type": "function", "function": function})
        else:
            raise _refuse_block(kind, at)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if thinking:
        message["reasoning_content"] = "\n".join(thinking)
    if calls:
        message["tool_calls"] = calls
    return message


def _messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if body.system is not None:
        system = _blocks(body.system, "system")
        texts = []
        for i, block in enumerate(system):
            if block["type"] != "text":
                raise APIError(400, f"system[{i}]: the system prompt takes text blocks only")
            texts.append(_text(block, f"system[{i}]"))
        out.append({"role": "system", "content": "\n\n".join(texts)})
    for i, message in enumerate(body.messages):
        where = f"messages[{i}]"
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise APIError(
                400, f"{where}: role must be 'user' or 'assistant' (give the system prompt as 'system')"
            )
        blocks = _blocks(message.get("content"), where)
        out += _user_messages(blocks, where) if role == "user" else [_assistant_message(blocks, where)]
    return out


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type", "custom")
        if kind != "custom":
            raise APIError(
                400,
                f"tools[{i}]: server tool {kind!r} is not available here; give custom tools (input_schema)",
            )
        unknown = sorted(set(tool) - {"type", "name", "description", "input_schema", "cache_control"})
        if unknown:
            raise APIError(400, f"tools[{i}]: unknown field {unknown[0]!r}")
        if not isinstance(tool.get("input_schema"), dict):
            raise APIError(400, f"tools[{i}]: input_schema must be a JSON schema object")
        # OpenAI's key order (name, description, parameters): the template renders the tool's JSON as given.
        function = {"name": tool.get("name")}
        if "description" in tool:
            function["description"] = tool["description"]
        function["parameters"] = tool["input_schema"]
        out.append({"type": "function", "function": function})
    return out


def _thinking(body: CountTokensRequest) -> dict[str, Any]:
    """The native thinking fields. Off unless asked (Anthropic's default): by `thinking` (enabled with
    budget_tokens → that budget) or by output_config.effort (→ reasoning_effort and its budget)."""
    thinking = body.thinking
    effort = body.output_config.effort if body.output_config else None
    native: dict[str, Any] = {}
    if effort is not None and (thinking is None or thinking.type != "disabled"):
        native["reasoning_effort"] = {"xhigh": "high", "max": "high"}.get(effort, effort)
    if thinking is not None:
        native["chat_template_kwargs"] = {"enable_thinking": thinking.type != "disabled"}
    elif effort is None:
        native["chat_template_kwargs"] = {"enable_thinking": False}
    if thinking is not None and thinking.budget_tokens is not None:
        if thinking.type != "enabled":
            raise APIError(400, "thinking: budget_tokens goes with type 'enabled'")
        native["thinking_budget"] = thinking.budget_tokens
    return native


def to_native(body: CountTokensRequest) -> ChatCompletionRequest:
    """The native chat request for a Messages (or count_tokens) body; APIError 400 for what cannot map."""
    messages = _messages(body)
    native: dict[str, Any] = {"model": body.model, "messages": messages}
    if body.tools:
        native["tools"] = _tools(body.tools)
    choice = body.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if choice.name is None:
                raise APIError(400, "tool_choice: type 'tool' needs the tool's 'name'")
            native["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        elif choice.name is not None:
            raise APIError(400, f"tool_choice: 'name' goes with type 'tool', not {choice.type!r}")
        else:
            native["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:
            native["parallel_tool_calls"] = False
    native |= _thinking(body)
    output = body.output_config
    if output is not None and output.format is not None:
        schema = {"name": "output", "schema": output.format.json_schema}
        native["response_format"] = {"type": "json_schema", "json_schema": schema}
    if messages[-1]["role"] == "assistant":
        native["continue_final_message"] = True  # Anthropic's prefill: the answer continues that text
    if isinstance(body, MessagesRequest):
        budget = body.thinking.budget_tokens if body.thinking is not None else None
        if budget is not None and budget >= body.max_tokens:
            raise APIError(400, "thinking.budget_tokens must be less than max_tokens")
        native |= {
            "max_tokens": body.max_tokens,
            "stream": body.stream,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
        }
        if body.stop_sequences:
            # The matched stop string is kept in the last event so the job can name it, then cut there.
            native |= {"stop": body.stop_sequences, "include_stop_str_in_output": True}
        user = (body.metadata or {}).get("user_id")
        if isinstance(user, str) and user:
            native["user"] = user[:MAX_NAME_CHARS]
    # Unknown fields ride along so the native path names them in its x-qwenkit-warning header.
    native |= {k: v for k, v in (body.model_extra or {}).items() if k not in _NATIVE_FIELDS}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in native.items() if v is not None})
    except ValidationError as exc:
        param, message = first_error(exc)
        raise APIError(400, message, param=param or None) from None


def _plan(ctx: ServeContext, body: CountTokensRequest, info: RequestInfo, stops: list[str]) -> Plan:
    try:
        omit = body.thinking is not None and body.thinking.display == "omitted"
        return plan_chat(
            ctx, to_native(body), info, job_factory=lambda parts: MessagesJob(parts, stops, omit)
        )
    except APIError as err:
        if err.param == "stop":  # the native path says "stop"; this API calls it stop_sequences
            err.message = "stop_sequences" + err.message.removeprefix("stop")
        raise


def plan_messages(ctx: ServeContext, body: MessagesRequest, info: RequestInfo) -> Plan:
    """Validate and plan a Messages request on the native path (blocking: run it in a worker thread)."""
    # The final message_delta carries the usage, so the job always gets it.
    return replace(_plan(ctx, body, info, body.stop_sequences or []), include_usage=True)


def count_tokens(ctx: ServeContext, body: CountTokensRequest, info: RequestInfo) -> int:
    """The rendered prompt's token count, exactly as /v1/messages would render it."""
    return _plan(ctx, body, info, []).prompt_tokens


# ---- native events → Anthropic blocks and events --------------------------------------------------------


class MessagesJob:
    """Parsed events → content blocks (thinking, text, tool_use) and their stream events; one choice."""

    media_type = "text/event-stream"

    def __init__(self, parts: ChatParts, stops: list[str], omit_thinking: bool = False) -> None:
        """stops: the stop_sequences; omit_thinking: thinking blocks come back empty (display omitted)."""
        self.ctx = parts.ctx
        self.model = parts.model  # "name:adapter" for a LoRA adapter
        self.id = "msg_" + parts.response_id.removeprefix("chatcmpl-")
        self.parser = parts.parser()
        self.prompt_tokens = parts.prompt_tokens
        self.max_calls = parts.max_calls
        self.stops = stops
        self.omit_thinking = omit_thinking
        self.blocks: list[dict[str, Any]] = []
        self.open = False
        self.raw: list[str] = []
        self.made_calls = False
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None

    def _message(self, content: list[dict[str, Any]], usage: dict[str, Any]) -> Item:
        return Item(
            type="message",
            id=self.id,
            role="assistant",
            model=self.model,
            content=content,
            stop_reason=self.stop_reason,
            stop_sequence=self.stop_sequence,
            usage=usage,
        )

    def start(self) -> list[BaseModel]:
        usage = {"input_tokens": self.prompt_tokens, "output_tokens": 0}
        return [Item(type="message_start", message=self._message([], usage)), Item(type="ping")]

    def _close(self) -> list[BaseModel]:
        if not self.open:
            return []
        self.open = False
        return [Item(type="content_block_stop", index=len(self.blocks) - 1)]

    def _begin(self, block: dict[str, Any]) -> list[BaseModel]:
        events = self._close()
        self.blocks.append(block)
        self.open = True
        start = {**block, "input": {}} if block["type"] == "tool_use" else block
        events.append(Item(type="content_block_start", index=len(self.blocks) - 1, content_block=dict(start)))
        return events

    def _text(self, kind: Literal["thinking", "text"], text: str) -> list[BaseModel]:
        events: list[BaseModel] = []
        if not (self.open and self.blocks[-1]["type"] == kind):
            empty = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else None
            events += self._begin(empty or {"type": "text", "text": ""})
        self.blocks[-1][kind] += text
        delta = {"type": f"{kind}_delta", kind: text}
        return [*events, Item(type="content_block_delta", index=len(self.blocks) - 1, delta=delta)]

    def on_event(self, index: int, event: TokenEvent) -> list[BaseModel]:
        text = event.text
        if event.finish_reason == "stop":
            # A stop string was kept in the final text (include_stop_str_in_output): name it, then cut it.
            hit = next((s for s in self.stops if text.endswith(s)), None)
            if hit is not None:
                self.stop_sequence, text = hit, text[: len(text) - len(hit)]
        self.raw.append(text)
        delta = self.parser.feed(text)
        if event.finished:
            delta = delta.then(self.parser.finish())
        if self.max_calls is not None:  # disable_parallel_tool_use: later calls are dropped whole
            delta = replace(delta, tool_calls=[c for c in delta.tool_calls if c.index < self.max_calls])
        events = self._apply(delta)
        if event.finished:
            events += self._close()
            finish = finish_reason(event, self.ctx.draining, self.made_calls)
            self.stop_reason = "stop_sequence" if self.stop_sequence else STOP_REASONS[finish]
        return events

    def _apply(self, delta: ParseDelta) -> list[BaseModel]:
        events: list[BaseModel] = []
        if delta.reasoning:
            events += self._text("thinking", "" if self.omit_thinking else delta.reasoning)
        if delta.content:
            events += self._text("text", delta.content)
        for _, call_id, name, arguments in merged_fragments(delta.tool_calls):
            if call_id is not None:  # a call's first fragment carries its id and name
                self.made_calls = True
                events += self._begin({"type": "tool_use", "id": call_id, "name": name, "input": ""})
            if arguments and self.open and self.blocks[-1]["type"] == "tool_use":
                self.blocks[-1]["input"] += arguments
                delta_json = {"type": "input_json_delta", "partial_json": arguments}
                events.append(Item(type="content_block_delta", index=len(self.blocks) - 1, delta=delta_json))
        return events

    def _usage(self, usage: Usage) -> dict[str, Any]:
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        # Anthropic counts cache reads apart from input_tokens; the three add up to the prompt.
        details = usage.completion_tokens_details
        return {
            "input_tokens": usage.prompt_tokens - (cached or 0),
            "cache_read_input_tokens": cached or 0,
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"thinking_tokens": (details.reasoning_tokens if details else 0) or 0},
        }

    def response(self, usage: Usage) -> BaseModel:
        content = []
        for block in self.blocks:
            if block["type"] == "tool_use":
                try:
                    args = json.loads(block["input"] or "{}")
                except json.JSONDecodeError:
                    args = {}  # the parser only closes calls whose arguments parse; a cut-off one is empty
                block = {**block, "input": args if isinstance(args, dict) else {}}
            content.append(block)
        return self._message(content, self._usage(usage))

    def usage_chunk(self, usage: Usage) -> BaseModel:
        delta = {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence}
        return Item(type="message_delta", delta=delta, usage=self._usage(usage))

    def completion_text(self, index: int) -> str:
        return "".join(self.raw)

    def frame(self, item: BaseModel, include_usage: bool) -> str:
        assert isinstance(item, Item)
        return f"event: {item.type}\ndata: {item.model_dump_json()}\n\n"

    def done(self) -> str:
        return 'event: message_stop\ndata: {"type":"message_stop"}\n\n'

    def error_frame(self, err: APIError) -> str:
        return f"event: error\ndata: {json.dumps(err.body('anthropic'))}\n\n"


# ---- routes -------------------------------------------------------------------------------------------


def install(app: FastAPI, ctx: ServeContext) -> None:
    """Add POST /v1/messages and /v1/messages/count_tokens to an app made by create_app."""
    from qwenkit.serve.app import _info, parse_body, run_planned  # app.py installs this module: import late

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await run_planned(request, ctx, MessagesRequest, plan_messages)

    @app.post("/v1/messages/count_tokens")
    async def messages_count_tokens(request: Request) -> JSONResponse:
        body = await parse_body(request, CountTokensRequest)
        tokens = await run_in_threadpool(count_tokens, ctx, body, _info(request))
        return JSONResponse({"input_tokens": tokens})
