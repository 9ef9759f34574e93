"""The internal chat types the renderer takes: Message, ToolCall and Tool (pydantic v2 models).

Contract: a Message that validates can always be rendered. Roles are system, user, assistant, tool; system,
user and tool messages need string content; only assistant messages carry tool_calls or reasoning_content;
tool_call_id belongs on tool messages only. A Tool keeps the exact dict it was given (key order included),
because the tools block prints each tool's JSON verbatim. messages_from_openai / tools_from_openai build these
from OpenAI-shaped dicts and raise ChatInputError (a ValueError) with a one-line message naming the fix.
An OpenAI "developer" message becomes a system Message in place (of the official templates at hand, none has
a developer role of its own): a first one is the system prompt, a later one renders where the family renders
a later system message (Qwen3.5 refuses one that is not first).
Images: a user or tool message may hold OpenAI `image_url` content parts; its `parts` then keep the text
runs and ImageParts (the URL as given, undecoded) in order, as the official templates read them, and its
content is the text alone. A list with images keeps its text runs as given (the templates join them with
nothing); a list of text parts only is still joined with newlines (as vLLM does). image_parts() lists a
conversation's images in prompt order.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    RootModel,
    ValidationError,
    field_validator,
    model_validator,
)

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
# OpenAI's newer name for the system role; read as system, since no Qwen flavour has its own.
OPENAI_ROLE_ALIASES: dict[str, Role] = {"developer": "system"}


class ChatInputError(ValueError):
    """A conversation or tool list that cannot be rendered; the message says how to fix it."""


def _check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{what} is not JSON-serializable ({exc}); use only dicts, lists, str, numbers, bool, None"
        ) from None


class ToolCall(BaseModel):
    """One function call an assistant made: arguments as the JSON string given, or as an object."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    arguments: str | dict[str, Any]
    id: str | None = None

    @field_validator("arguments")
    @classmethod
    def _json_arguments(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        if isinstance(value, dict):
            _check_json(value, "tool call arguments")
            return copy.deepcopy(value)  # frozen model: later edits to the caller's dict must not leak in
        return value

    def arguments_json(self) -> str:
        """The arguments as they appear in a prompt: the string as given, or the object as JSON."""
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, ensure_ascii=False)


class ImagePart(BaseModel):
    """One image's place in a message: its URL (data:, http(s):) as the client gave it, not yet read."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(min_length=1)
    detail: str | None = None


ContentPart = str | ImagePart


class Message(BaseModel):
    """One chat message in the renderer's terms (see the module docstring for the rules)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str | None = None
    parts: tuple[ContentPart, ...] | None = None  # text and images in order, when the message has images
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, value: Any) -> Any:
        if value not in ROLES:
            raise ValueError(f"unknown role {value!r}: use one of {', '.join(ROLES)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Message:
        role = self.role
        if role != "assistant" and self.content is None:
            raise ValueError(f"{role} message has no content: give its text as a string in 'content'")
        if role != "assistant" and self.tool_calls:
            raise ValueError(
                f"a {role} message cannot carry tool_calls: only assistant messages make tool calls"
            )
        if role != "assistant" and self.reasoning_content is not None:
            raise ValueError(
                f"a {role} message cannot carry reasoning_content: only assistant messages reason"
            )
        if self.parts is not None and role not in ("user", "tool"):
            raise ValueError(f"{role} messages cannot contain images: put images in user messages")
        if role != "tool" and self.tool_call_id is not None:
            raise ValueError(f"tool_call_id belongs on tool messages only, not on a {role} message")
        if (
            role == "assistant"
            and self.content is None
            and self.reasoning_content is None
            and not self.tool_calls
        ):
            raise ValueError("assistant message is empty: give content, reasoning_content or tool_calls")
        return self

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI-shaped dict (the form chat templates take); None-valued optional keys are left out."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.parts is not None:
            out["content"] = [
                {"type": "text", "text": p}
                if isinstance(p, str)
                else {
                    "type": "image_url",
                    "image_url": {"url": p.url, **({"detail": p.detail} if p.detail else {})},
                }
                for p in self.parts
            ]
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = [
                {
                    **({"id": call.id} if call.id is not None else {}),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class Tool(RootModel[dict[str, Any]]):
    """A function definition {"type": "function", "function": {"name", "description", "parameters"}}.

    The root dict is kept as given (extra keys and key order included) so it dumps back unchanged.
    """

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _own_copy(cls, data: Any) -> Any:
        # Frozen model: later edits to the caller's nested dicts must not leak in.
        return copy.deepcopy(data)

    @model_validator(mode="after")
    def _function_shape(self) -> Tool:
        tool = self.root
        if "function" not in tool and "name" in tool:
            raise ValueError(
                'tool is in the flat form: wrap it as {"type": "function", "function": {"name": ..., ...}}'
            )
        if tool.get("type") != "function":
            raise ValueError(
                f'tool type must be "function", got {tool.get("type")!r}: set "type": "function"'
            )
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValueError(
                'tool has no "function" object: give {"name": ..., "description": ..., "parameters": ...}'
            )
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError('tool function needs a non-empty string "name"')
        if "description" in fn and not isinstance(fn["description"], str):
            raise ValueError('tool function "description" must be a string')
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ValueError('tool function "parameters" must be a JSON Schema object (a dict)')
        _check_json(tool, f"tool {fn['name']!r}")
        return self

    @classmethod
    def from_function(
        cls, name: str, description: str | None = None, parameters: dict[str, Any] | None = None
    ) -> Tool:
        """Build the OpenAI function-tool dict from its parts (absent parts are left out)."""
        fn: dict[str, Any] = {"name": name}
        if description is not None:
            fn["description"] = description
        if parameters is not None:
            fn["parameters"] = parameters
        return cls({"type": "function", "function": fn})

    @property
    def name(self) -> str:
        return self.root["function"]["name"]

    @property
    def description(self) -> str | None:
        return self.root["function"].get("description")

    @property
    def parameters(self) -> dict[str, Any] | None:
        return self.root["function"].get("parameters")

    def to_json(self) -> str:
        """The tool as the tools block prints it (json.dumps, non-ASCII kept, default separators)."""
        return json.dumps(self.root, ensure_ascii=False)


def _first_error(exc: ValidationError) -> str:
    # One line: where, then pydantic's message without its "Value error, " prefix.
    err = exc.errors()[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {msg}" if loc and err["type"] != "value_error" else msg


_OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")
_MESSAGE_KEYS = frozenset(
    {"role", "content", "reasoning_content", "reasoning", "tool_calls", "tool_call_id", "name"}
)


_DETAILS = ("auto", "low", "high")


def _image_part(part: Mapping[str, Any], where: str) -> ImagePart:
    image = part.get("image_url")
    if isinstance(image, str):  # some clients send the URL itself
        image = {"url": image}
    if not isinstance(image, Mapping) or not isinstance(image.get("url"), str) or not image["url"]:
        raise ChatInputError(
            f"{where}: an image_url part needs {{'image_url': {{'url': 'data:image/png;base64,...'}}}}"
        )
    unknown = sorted(set(image) - {"url", "detail"})
    if unknown:
        raise ChatInputError(f"{where}: unknown key {unknown[0]!r} in image_url; known keys are detail, url")
    detail = image.get("detail")
    if detail is not None and detail not in _DETAILS:
        raise ChatInputError(f"{where}: image_url.detail must be one of {', '.join(_DETAILS)}")
    return ImagePart(url=image["url"], detail=detail)


def _content(content: Any, where: str) -> tuple[str | None, tuple[ContentPart, ...] | None]:
    """(text, parts): OpenAI content as its text, and its parts in order when it holds images. Text parts
    alone are joined with newlines (as vLLM does); with images, parts are kept as the templates read them."""
    if content is None or isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise ChatInputError(f"{where}: content must be a string, a list of content parts or null")
    parts: list[ContentPart] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image_url":
            parts.append(_image_part(part, f"{where}.content[{j}]"))
        else:
            raise ChatInputError(
                f"{where}.content[{j}]: content parts are {{'type': 'text', 'text': ...}} or "
                "{'type': 'image_url', 'image_url': {'url': ...}}"
            )
    if not any(isinstance(p, ImagePart) for p in parts):
        return "\n".join(p for p in parts if isinstance(p, str)), None
    return "".join(p for p in parts if isinstance(p, str)), tuple(parts)


def image_parts(messages: Iterable[Message]) -> list[ImagePart]:
    """Every image of a conversation, in the order the prompt holds them."""
    return [p for m in messages for p in (m.parts or ()) if isinstance(p, ImagePart)]


def _tool_call(raw: Any, where: str) -> ToolCall:
    if not isinstance(raw, Mapping):
        raise ChatInputError(
            f"{where}: a tool call must be a dict like {{'type': 'function', 'function': {{...}}}}"
        )
    if "function" in raw:
        if raw.get("type", "function") != "function":
            raise ChatInputError(f"{where}: tool call type must be 'function', got {raw.get('type')!r}")
        fn = raw["function"]
        if not isinstance(fn, Mapping):
            raise ChatInputError(f"{where}: tool call 'function' must be a dict with 'name' and 'arguments'")
    else:
        fn = raw  # the flat {"name", "arguments"} form
    if "arguments" not in fn:
        raise ChatInputError(
            f"{where}: tool call has no 'arguments'; give a JSON string or an object ('{{}}' for none)"
        )
    try:
        return ToolCall(name=fn.get("name"), arguments=fn["arguments"], id=raw.get("id"))
    except ValidationError as exc:
        raise ChatInputError(f"{where}: {_first_error(exc)}") from None


def message_from_openai(raw: Mapping[str, Any], where: str = "message") -> Message:
    """One Message from an OpenAI-shaped dict; keys outside the chat schema are refused unless null."""
    if not isinstance(raw, Mapping):
        raise ChatInputError(
            f"{where}: a message must be a dict with 'role' and 'content', got {type(raw).__name__}"
        )
    unknown = sorted(k for k, v in raw.items() if k not in _MESSAGE_KEYS and v is not None)
    if unknown:
        raise ChatInputError(
            f"{where}: unknown key {unknown[0]!r}; known keys are {', '.join(sorted(_MESSAGE_KEYS))}"
        )
    if "role" not in raw:
        raise ChatInputError(f"{where}: message has no 'role'; use one of {', '.join(_OPENAI_ROLES)}")
    role = raw["role"]
    if isinstance(role, str) and role in OPENAI_ROLE_ALIASES:
        role = OPENAI_ROLE_ALIASES[role]
    elif role not in ROLES:
        raise ChatInputError(f"{where}: unknown role {role!r}: use one of {', '.join(_OPENAI_ROLES)}")
    reasoning = raw.get("reasoning_content")
    if reasoning is None:
        reasoning = raw.get("reasoning")
    raw_calls = raw.get("tool_calls") or []
    if not isinstance(raw_calls, list):
        raise ChatInputError(f"{where}: tool_calls must be a list")
    calls = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(raw_calls)]
    text, parts = _content(raw.get("content"), where)
    if parts is not None and role not in ("user", "tool"):
        raise ChatInputError(f"{where}: {role} messages cannot contain images; put images in user messages")
    try:
        return Message(
            role=role,
            content=text,
            parts=parts,
            reasoning_content=reasoning,
            tool_calls=calls,
            tool_call_id=raw.get("tool_call_id"),
            name=raw.get("name"),
        )
    except ValidationError as exc:
        raise ChatInputError(f"{where}: {_first_error(exc)}") from None


def messages_from_openai(items: Iterable[Mapping[str, Any]]) -> list[Message]:
    """Messages from OpenAI-shaped dicts (tool_calls under "function", or the flat name/arguments form)."""
    return [message_from_openai(raw, f"messages[{i}]") for i, raw in enumerate(items)]


def tools_from_openai(items: Iterable[Mapping[str, Any]]) -> list[Tool]:
    """Tools from OpenAI function-tool dicts, each kept exactly as given."""
    tools = []
    for i, raw in enumerate(items):
        if not isinstance(raw, Mapping):
            raise ChatInputError(
                f"tools[{i}]: a tool must be a dict like {{'type': 'function', 'function': {{...}}}}"
            )
        try:
            tools.append(Tool(dict(raw)))
        except ValidationError as exc:
            raise ChatInputError(f"tools[{i}]: {_first_error(exc)}") from None
    return tools
