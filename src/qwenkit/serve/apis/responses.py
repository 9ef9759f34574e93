"""The OpenAI Responses API (`POST /v1/responses`) over the native path.

Contract: a Responses request becomes a native chat request (instructions → a system message; `input` as
text or items: message items with input_text/output_text parts (input_image in user messages → image_url
parts, read by qwenkit.media like chat images), function_call and function_call_output
items → assistant tool calls and tool messages, reasoning items → the next assistant turn's reasoning;
function tools → tools; tool_choice; text.format json_schema/json_object → the answer's grammar;
reasoning.effort → reasoning_effort, which the native path maps to thinking and its budget;
max_output_tokens → max_tokens) and is planned and run by serve/handlers.py like any chat request. The
parsed events come back as output items (reasoning with reasoning_text content, and the same text as its
summary when reasoning.summary is asked, as Qwen writes no separate summary; message with output_text;
function_call), streamed with the SDK's event names (response.created ... response.completed, every event
with its sequence_number); a max_output_tokens cut-off answers status "incomplete" (streamed in the final
response.completed event, which the SDK needs). previous_response_id reads a bounded in-memory LRU store
of finished conversations (ResponseStore), kept per API key and off unless `qwenkit serve
--responses-store N`; GET /v1/responses/{id} returns a stored response object and DELETE forgets it (per
key: another key's id is 404, as an unknown one). Errors use OpenAI's shape.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwenkit.chat.parse import ParseDelta
from qwenkit.engines.request import TokenEvent
from qwenkit.serve.errors import APIError
from qwenkit.serve.events import finish_reason, merged_fragments
from qwenkit.serve.handlers import ChatParts, Plan, ServeContext, plan_chat
from qwenkit.serve.logs import RequestInfo
from qwenkit.serve.protocol import MAX_NAME_CHARS, ChatCompletionRequest, Usage, first_error

_NATIVE_FIELDS = frozenset(ChatCompletionRequest.model_fields)
# Effort words the SDK sends → the native reasoning_effort (which maps to thinking on/off and a budget).
EFFORTS = {
    "none": "none",
    "minimal": "minimal",
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
}
MAX_ID_CHARS = 128


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, min_length=1, max_length=64)
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(BaseModel):
    """The body of /v1/responses; unknown top-level fields are kept (and named in a warning)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


class Item(BaseModel):
    """One stream event, named by its `type`, as it goes on the wire."""

    model_config = ConfigDict(extra="allow")
    type: str


class ResponseObject(BaseModel):
    """The response object (fields as the SDK's Response) as it goes on the wire."""

    model_config = ConfigDict(extra="allow")


# ---- the previous_response_id store ---------------------------------------------------------------------


@dataclass
class Stored:
    key: str
    messages: list[dict[str, Any]]  # the conversation (input and output, no instructions) as native messages
    response: dict[str, Any] | None = None  # the response object, for GET /v1/responses/{id}


class ResponseStore:
    """The last `capacity` responses' conversations (LRU); locked, as worker threads plan requests."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response_id: str, stored: Stored) -> None:
        with self._lock:
            self._items[response_id] = stored
            self._items.move_to_end(response_id)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str, key: str) -> list[dict[str, Any]] | None:
        """The conversation, or None when unknown, evicted or stored under another key."""
        stored = self._find(response_id, key)
        return None if stored is None else stored.messages

    def response(self, response_id: str, key: str) -> dict[str, Any] | None:
        """The stored response object, or None (unknown, evicted, deleted or another key's)."""
        stored = self._find(response_id, key)
        return None if stored is None else stored.response

    def delete(self, response_id: str, key: str) -> bool:
        """Forget a response of this key; False when there is none to forget."""
        with self._lock:
            stored = self._items.get(response_id)
            if stored is None or stored.key != key:
                return False
            del self._items[response_id]
            return True

    def _find(self, response_id: str, key: str) -> Stored | None:
        with self._lock:
            stored = self._items.get(response_id)
            if stored is None or stored.key != key:
                return None
            self._items.move_to_end(response_id)
            return stored


# ---- request → native request ------------------------------------------------------------------------


def _text_of(content: Any, where: str, kinds: tuple[str, ...], images: bool = False) -> Any:
    """A message's text: a string, or parts of the given kinds (input_text, output_text) joined. With
    `images`, input_image parts are taken too, and content holding one becomes chat parts in order (text and
    image_url), which the chat layer reads and checks like any other image."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content must be a string or a list of content parts", param="input")
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "input_image" and images:
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise APIError(
                    400,
                    f"{where}.content[{i}]: input_image needs an 'image_url' (a data: URL); file_id is not "
                    "supported",
                    param="input",
                )
            parts.append(
                {"type": "image_url", "image_url": {"url": url, "detail": part.get("detail") or "auto"}}
            )
            continue
        if kind in ("input_image", "input_file", "input_audio"):
            raise APIError(
                400,
                f"{where}.content[{i}]: {kind} is not supported here; "
                + (
                    "images go in user messages"
                    if kind == "input_image"
                    else "this server reads text and images"
                ),
                param="input",
            )
        if kind not in kinds or not isinstance(part.get("text"), str):
            raise APIError(
                400,
                f"{where}.content[{i}]: expected a part of type {' or '.join(kinds)} with 'text'",
                param="input",
            )
        parts.append({"type": "text", "text": part["text"]})
    if any(p["type"] == "image_url" for p in parts):
        return parts
    return "".join(p["text"] for p in parts)


def _string(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{where}: '{name}' must be a non-empty string", param="input")
    return value


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The native messages for `input` (no instructions); APIError 400 naming the item that cannot map."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise APIError(400, "input: give a string or a non-empty list of items", param="input")
    out: list[dict[str, Any]] = []
    reasoning: list[str] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(
                    400, f"{where}: role must be user, system, developer or assistant", param="input"
                )
            kinds = ("output_text", "refusal") if role == "assistant" else ("input_text",)
            text = _text_of(item.get("content"), where, kinds, images=role == "user")
            if role == "assistant":
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if reasoning:
                    message["reasoning_content"], reasoning = "\n".join(reasoning), []
                out.append(message)
            else:
                out.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", where),
                "type": "function",
                "function": {"name": _string(item, "name", where), "arguments": item.get("arguments")},
            }
            if not isinstance(call["function"]["arguments"], str):
                raise APIError(400, f"{where}: 'arguments' must be a JSON string", param="input")
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and (last.get("tool_calls") or not reasoning):
                last.setdefault("tool_calls", []).append(call)  # parallel calls: one assistant turn
            else:
                message = {"role": "assistant", "content": "", "tool_calls": [call]}
                if reasoning:
                    message["reasoning_content"], reasoning = "\n".join(reasoning), []
                out.append(message)
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = _text_of(output, where, ("input_text",))
            out.append({"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": output})
        elif kind == "reasoning":
            parts = [*(item.get("content") or []), *(item.get("summary") or [])]
            for j, part in enumerate(parts):
                if not isinstance(part, dict) or not isinstance(part.get("text"), str):
                    raise APIError(400, f"{where}: reasoning part {j} needs 'text'", param="input")
            reasoning.append("\n".join(p["text"] for p in (item.get("content") or item.get("summary") or [])))
        elif kind == "item_reference":
            raise APIError(
                400, f"{where}: item_reference is not supported; send the item itself", param="input"
            )
        else:
            raise APIError(400, f"{where}: unknown input item type {kind!r}", param="input")
    return out


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise APIError(
                400,
                f"tools[{i}]: tool type {kind!r} is not available here; give function tools",
                param="tools",
            )
        unknown = sorted(set(tool) - {"type", "name", "description", "parameters", "strict"})
        if unknown:
            raise APIError(400, f"tools[{i}]: unknown field {unknown[0]!r}", param="tools")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise APIError(
                400, "tool_choice: expected auto, none, required or a function", param="tool_choice"
            )
        return choice
    if (
        choice.get("type") != "function"
        or not isinstance(choice.get("name"), str)
        or set(choice)
        != {
            "type",
            "name",
        }
    ):
        raise APIError(400, 'tool_choice: expected {"type": "function", "name": ...}', param="tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(fmt: TextFormat) -> dict[str, Any]:
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    if fmt.json_schema is None:
        raise APIError(400, "text.format: json_schema needs a 'schema' object", param="text.format")
    schema: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.json_schema}
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": schema}


def to_native(body: ResponsesRequest, history: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The native chat request: instructions, then the stored history, then this request's input."""
    messages = list(history) + input_messages(body.input)
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
    native: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stream": body.stream,
        "parallel_tool_calls": body.parallel_tool_calls,
        "user": body.user,
    }
    if body.tools:
        native["tools"] = _tools(body.tools)
    if body.tool_choice is not None:
        native["tool_choice"] = _tool_choice(body.tool_choice)
    if body.text is not None and body.text.format is not None:
        native["response_format"] = _response_format(body.text.format)
    if body.reasoning is not None and body.reasoning.effort is not None:
        native["reasoning_effort"] = EFFORTS[body.reasoning.effort]
    # Unknown fields ride along so the native path names them in its x-qwenkit-warning header.
    native |= {k: v for k, v in (body.model_extra or {}).items() if k not in _NATIVE_FIELDS}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in native.items() if v is not None})
    except ValidationError as exc:
        param, message = first_error(exc)
        param = {"max_completion_tokens": "max_output_tokens", "response_format": "text.format"}.get(
            param, param
        )
        raise APIError(400, message, param=param or None) from None


# ---- native events → Responses items and events --------------------------------------------------------


class ResponsesJob:
    """Parsed events → output items (reasoning, message, function_call) and their stream events."""

    media_type = "text/event-stream"

    def __init__(
        self,
        parts: ChatParts,
        body: ResponsesRequest,
        history: list[dict[str, Any]],
        on_done: Callable[[str, list[dict[str, Any]], dict[str, Any]], None] | None,
    ) -> None:
        """history: the conversation before this input; on_done(id, conversation, response object) stores a
        finished one."""
        self.ctx = parts.ctx
        self.model = parts.model  # "name:adapter" for a LoRA adapter
        self.suffix = parts.response_id.removeprefix("chatcmpl-")
        self.id = "resp_" + self.suffix
        self.parser = parts.parser()
        self.max_calls = parts.max_calls
        self.body = body
        self.history = history
        self.on_done = on_done
        self.created = int(time.time())
        self.items: list[dict[str, Any]] = []
        self.open = False
        self.raw: list[str] = []
        self.made_calls = False
        self.seq = 0
        self.status = "in_progress"
        self.incomplete: dict[str, str] | None = None
        self.stored = False
        # Qwen writes no separate summary: with reasoning.summary asked, the summary is the reasoning itself.
        self.summary = body.reasoning is not None and bool(
            body.reasoning.summary or body.reasoning.generate_summary
        )

    def _event(self, kind: str, **fields: Any) -> Item:
        item = Item(type=kind, sequence_number=self.seq, **fields)
        self.seq += 1
        return item

    def _response(self, usage: dict[str, Any] | None) -> dict[str, Any]:
        body = self.body
        fmt = body.text.format if body.text is not None and body.text.format is not None else None
        reasoning = body.reasoning.model_dump(exclude_none=True) if body.reasoning else {}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "model": self.model,
            "status": self.status,
            "error": None,
            "incomplete_details": self.incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "metadata": body.metadata or {},
            "output": [dict(item) for item in self.items],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "store": self.stored,
            "temperature": body.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "top_p": body.top_p,
            "usage": usage,
            "user": body.user,
        }

    def start(self) -> list[BaseModel]:
        return [
            self._event("response.created", response=self._response(None)),
            self._event("response.in_progress", response=self._response(None)),
        ]

    def _close(self, status: str = "completed") -> list[BaseModel]:
        if not self.open:
            return []
        self.open = False
        index = len(self.items) - 1
        item = self.items[index]
        item["status"] = status
        item_id = item["id"]
        events: list[BaseModel] = []
        if item["type"] == "message":
            part = item["content"][0]
            common = {"item_id": item_id, "output_index": index, "content_index": 0}
            events += [
                self._event("response.output_text.done", **common, text=part["text"], logprobs=[]),
                self._event("response.content_part.done", **common, part=dict(part)),
            ]
        elif item["type"] == "reasoning":
            text = item["content"][0]["text"]
            where = {"item_id": item_id, "output_index": index}
            events.append(self._event("response.reasoning_text.done", **where, content_index=0, text=text))
            if self.summary:
                part = {"type": "summary_text", "text": text}
                item["summary"] = [part]
                events += [
                    self._event("response.reasoning_summary_text.done", **where, summary_index=0, text=text),
                    self._event("response.reasoning_summary_part.done", **where, summary_index=0, part=part),
                ]
        else:
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item_id,
                    output_index=index,
                    arguments=item["arguments"],
                    name=item["name"],
                )
            )
        events.append(self._event("response.output_item.done", output_index=index, item=_copy(item)))
        return events

    def _begin(self, item: dict[str, Any]) -> list[BaseModel]:
        events = self._close()
        self.items.append(item)
        self.open = True
        index = len(self.items) - 1
        events.append(self._event("response.output_item.added", output_index=index, item=_copy(item)))
        if item["type"] == "reasoning" and self.summary:
            part = {"type": "summary_text", "text": ""}
            where = {"item_id": item["id"], "output_index": index, "summary_index": 0}
            events.append(self._event("response.reasoning_summary_part.added", **where, part=part))
        if item["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"].append(part)
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=dict(part),
                )
            )
        return events

    def _text(self, kind: Literal["reasoning", "message"], text: str) -> list[BaseModel]:
        events: list[BaseModel] = []
        if not (self.open and self.items[-1]["type"] == kind):
            n = len(self.items)
            if kind == "reasoning":
                item = {
                    "type": "reasoning",
                    "id": f"rs_{self.suffix}_{n}",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": ""}],
                    "status": "in_progress",
                }
            else:
                item = {
                    "type": "message",
                    "id": f"msg_{self.suffix}_{n}",
                    "role": "assistant",
                    "content": [],
                    "status": "in_progress",
                }
            events += self._begin(item)
        index = len(self.items) - 1
        self.items[-1]["content"][0]["text"] += text
        where = {"item_id": self.items[-1]["id"], "output_index": index, "content_index": 0}
        if kind == "reasoning":
            events.append(self._event("response.reasoning_text.delta", **where, delta=text))
            if self.summary:
                at = {"item_id": where["item_id"], "output_index": index, "summary_index": 0}
                events.append(self._event("response.reasoning_summary_text.delta", **at, delta=text))
            return events
        return [*events, self._event("response.output_text.delta", **where, delta=text, logprobs=[])]

    def on_event(self, index: int, event: TokenEvent) -> list[BaseModel]:
        self.raw.append(event.text)
        delta = self.parser.feed(event.text)
        if event.finished:
            delta = delta.then(self.parser.finish())
        if self.max_calls is not None:  # parallel_tool_calls false: later calls are dropped whole
            delta = replace(delta, tool_calls=[c for c in delta.tool_calls if c.index < self.max_calls])
        events = self._apply(delta)
        if event.finished:
            finish = finish_reason(event, self.ctx.draining, self.made_calls)
            cut = finish == "length"
            events += self._close("incomplete" if cut else "completed")
            self.status = "incomplete" if cut else "completed"
            self.incomplete = {"reason": "max_output_tokens"} if cut else None
        return events

    def _apply(self, delta: ParseDelta) -> list[BaseModel]:
        events: list[BaseModel] = []
        if delta.reasoning:
            events += self._text("reasoning", delta.reasoning)
        if delta.content:
            events += self._text("message", delta.content)
        for _, call_id, name, arguments in merged_fragments(delta.tool_calls):
            if call_id is not None:  # a call's first fragment carries its id and name
                self.made_calls = True
                n = len(self.items)
                item = {
                    "type": "function_call",
                    "id": f"fc_{self.suffix}_{n}",
                    "call_id": call_id,
                    "name": name,
                    "arguments": "",
                    "status": "in_progress",
                }
                events += self._begin(item)
            if arguments and self.open and self.items[-1]["type"] == "function_call":
                self.items[-1]["arguments"] += arguments
                events.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=self.items[-1]["id"],
                        output_index=len(self.items) - 1,
                        delta=arguments,
                    )
                )
        return events

    def _usage(self, usage: Usage) -> dict[str, Any]:
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        details = usage.completion_tokens_details
        return {
            "input_tokens": usage.prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached or 0, "cache_write_tokens": 0},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": (details.reasoning_tokens if details else 0) or 0},
            "total_tokens": usage.total_tokens,
        }

    def _finish(self, usage: dict[str, Any]) -> None:
        """Store the finished conversation and response once (the store is on and the client did not say
        store false)."""
        if self.on_done is None or self.stored or self.body.store is False:
            return
        self.stored = True
        conversation = self.history + input_messages(self.body.input) + output_messages(self.items)
        self.on_done(self.id, conversation, self._response(usage))

    def response(self, usage: Usage) -> BaseModel:
        self._finish(self._usage(usage))
        return ResponseObject(**self._response(self._usage(usage)))

    def usage_chunk(self, usage: Usage) -> BaseModel:
        self._finish(self._usage(usage))
        # Always response.completed (its response says "incomplete" for a cut-off), as vLLM does: the SDK's
        # stream.get_final_response() only accepts a response.completed event.
        return self._event("response.completed", response=self._response(self._usage(usage)))

    def completion_text(self, index: int) -> str:
        return "".join(self.raw)

    def frame(self, item: BaseModel, include_usage: bool) -> str:
        assert isinstance(item, Item)
        return f"event: {item.type}\ndata: {item.model_dump_json()}\n\n"

    def done(self) -> str:
        return ""  # the Responses stream ends with response.completed; no [DONE] line

    def error_frame(self, err: APIError) -> str:
        error = self._event("error", code=err.code or err.type, message=err.message, param=err.param)
        return f"event: error\ndata: {error.model_dump_json()}\n\n"


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(item))


def output_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the native assistant message that the next turn continues from."""
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in items:
        if item["type"] == "reasoning":
            message["reasoning_content"] = item["content"][0]["text"]
        elif item["type"] == "message":
            message["content"] += item["content"][0]["text"]
        else:
            call = {"name": item["name"], "arguments": item["arguments"] or "{}"}
            message.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function", "function": call}
            )
    return [message]


# ---- routes -------------------------------------------------------------------------------------------


def plan_responses(
    ctx: ServeContext, body: ResponsesRequest, info: RequestInfo, store: ResponseStore | None
) -> Plan:
    """Validate and plan a Responses request on the native path (blocking: run it in a worker thread)."""
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        if store is None:
            raise APIError(
                400,
                "previous_response_id needs the server's response store; start the server with "
                "`qwenkit serve --responses-store N` or send the whole conversation as input",
                param="previous_response_id",
            )
        found = store.get(body.previous_response_id, info.rate_key)
        if found is None:
            raise APIError(
                404,
                f"previous response {body.previous_response_id!r} is not stored here (unknown, another "
                f"key's, or evicted: --responses-store keeps the last {store.capacity})",
                param="previous_response_id",
                code="not_found",
            )
        history = found
    key = info.rate_key
    on_done = None if store is None else (lambda rid, msgs, resp: store.put(rid, Stored(key, msgs, resp)))
    try:
        plan = plan_chat(
            ctx,
            to_native(body, history),
            info,
            job_factory=lambda parts: ResponsesJob(parts, body, history, on_done),
        )
    except APIError as exc:
        if exc.param == "messages":  # the native request's messages are this API's input items
            exc.param = "input"
        raise
    # response.completed carries the usage, so the job always gets it.
    return replace(plan, include_usage=True)


def _not_found(response_id: str, store: ResponseStore | None) -> APIError:
    where = (
        "the server keeps no responses: start it with `qwenkit serve --responses-store N`"
        if store is None
        else f"unknown, deleted, another key's, or evicted (the store keeps the last {store.capacity})"
    )
    return APIError(404, f"response {response_id[:MAX_ID_CHARS]!r} not found: {where}", code="not_found")


def install(app: FastAPI, ctx: ServeContext) -> None:
    """Add POST /v1/responses and GET / DELETE /v1/responses/{id} to an app made by create_app (the store
    when config.responses_store > 0)."""
    from qwenkit.serve.app import _info, run_planned  # app.py installs this module: import it late

    capacity = ctx.config.responses_store
    store = ResponseStore(capacity) if capacity else None

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await run_planned(request, ctx, ResponsesRequest, plan_responses, store)

    @app.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str, request: Request) -> JSONResponse:
        found = store.response(response_id, _info(request).rate_key) if store is not None else None
        if found is None:
            raise _not_found(response_id, store)
        return JSONResponse(found)

    @app.delete("/v1/responses/{response_id}")
    async def delete(response_id: str, request: Request) -> JSONResponse:
        if store is None or not store.delete(response_id, _info(request).rate_key):
            raise _not_found(response_id, store)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
