"""The OpenAPI document of `qwenkit serve` (GET /openapi.json), with the request bodies declared.

Contract: the POST routes parse their bodies by hand (app.parse_body: strict pydantic models, a 4xx for
anything malformed), so FastAPI cannot see them. install_openapi() makes app.openapi() return FastAPI's
document with each such route's requestBody declared: the JSON schema of the model it parses (protocol.py,
apis/), where the parts the OpenAI models keep as plain dicts are described in their OpenAI
shapes (messages, tools, and the JSON Schema inside response_format and each tool), `model` is limited to
the served name and this server's caps (ServeConfig) are the maxima, so a schema-driven client or fuzzer
builds real requests. The models stay the judges: a body the document allows may still get a 400 for what
JSON Schema cannot say (unique tool names, a prompt that fits the context). Built once per app, on first use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from qwenkit.serve.apis.anthropic import CountTokensRequest, MessagesRequest
from qwenkit.serve.apis.batches import BatchCreate
from qwenkit.serve.apis.embeddings import EmbeddingsRequest
from qwenkit.serve.apis.ollama import (
    OllamaChatRequest,
    OllamaEmbeddingsRequest,
    OllamaEmbedRequest,
    OllamaGenerateRequest,
    ShowRequest,
)
from qwenkit.serve.apis.responses import ResponsesRequest
from qwenkit.serve.config import ServeConfig
from qwenkit.serve.protocol import ChatCompletionRequest, CompletionRequest

BODY_MODELS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/messages": MessagesRequest,  # Anthropic's shapes: messages and tools stay open objects here
    "/v1/messages/count_tokens": CountTokensRequest,
    "/v1/responses": ResponsesRequest,  # input items and tools stay open objects here
    "/api/chat": OllamaChatRequest,
    "/api/generate": OllamaGenerateRequest,
    "/api/show": ShowRequest,
    "/api/embed": OllamaEmbedRequest,
    "/api/embeddings": OllamaEmbeddingsRequest,
    "/v1/batches": BatchCreate,
    "/v1/embeddings": EmbeddingsRequest,
}
REF = "#/components/schemas/{model}"
JSON_TYPES = ["object", "array", "string", "number", "integer", "boolean", "null"]

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": REF.format(model=name)}


def _string(**extra: Any) -> Schema:
    return {"type": "string", **extra}


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _json_schema_shape() -> Schema:
    """What the server takes as a JSON Schema: any object; these keywords in their usual types."""
    sub = _ref("JsonSchema")
    count = {"type": "integer", "minimum": 0}
    return {
        "type": "object",
        "description": "A JSON Schema. Keywords the grammar cannot enforce are named in x-qwenkit-warning.",
        "properties": {
            "type": {
                "anyOf": [
                    {"enum": JSON_TYPES},
                    {"type": "array", "items": {"enum": JSON_TYPES}, "minItems": 1, "uniqueItems": True},
                ]
            },
            "properties": {"type": "object", "additionalProperties": sub},
            "required": {"type": "array", "items": _string()},
            "additionalProperties": {"anyOf": [{"type": "boolean"}, sub]},
            "items": sub,
            "prefixItems": {"type": "array", "items": sub},
            "enum": {"type": "array", "minItems": 1},
            "const": {},
            "anyOf": {"type": "array", "items": sub, "minItems": 1},
            "oneOf": {"type": "array", "items": sub, "minItems": 1},
            "allOf": {"type": "array", "items": sub, "minItems": 1},
            "$defs": {"type": "object", "additionalProperties": sub},
            "$ref": _string(),
            "pattern": _string(),
            "format": _string(),
            "minLength": count,
            "maxLength": count,
            "minItems": count,
            "maxItems": count,
            "minimum": {"type": "number"},
            "maximum": {"type": "number"},
            "title": _string(),
            "description": _string(),
        },
        "additionalProperties": True,
    }


def _message_shapes() -> dict[str, Schema]:
    """The chat messages chat.messages accepts (text content only), one shape per role."""
    content = {
        "anyOf": [
            _string(),
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"type": {"const": "text"}, "text": _string()},
                    "required": ["type", "text"],
                    "additionalProperties": False,
                },
            },
        ]
    }
    call = {
        "type": "object",
        "properties": {
            "id": _string(),
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "properties": {"name": _string(minLength=1), "arguments": _string()},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            },
        },
        "required": ["type", "function"],
        "additionalProperties": False,
    }

    def shape(roles: list[str], properties: Schema, required: list[str]) -> Schema:
        return {
            "type": "object",
            "properties": {"role": {"enum": roles}, **properties},
            "required": ["role", *required],
            "additionalProperties": False,
        }

    assistant = shape(
        ["assistant"],
        {
            "content": _nullable(content),
            "reasoning_content": _nullable(_string()),
            "tool_calls": {"type": "array", "items": call},
            "name": _string(),
        },
        [],
    )
    # An assistant message says something: content, reasoning or at least one call.
    assistant["anyOf"] = [
        {"required": ["content"], "properties": {"content": content}},
        {"required": ["reasoning_content"], "properties": {"reasoning_content": _string()}},
        {"required": ["tool_calls"], "properties": {"tool_calls": {"minItems": 1}}},
    ]
    return {
        "SystemMessage": shape(["system", "developer"], {"content": content, "name": _string()}, ["content"]),
        "UserMessage": shape(["user"], {"content": content, "name": _string()}, ["content"]),
        "AssistantMessage": assistant,
        "ToolMessage": shape(["tool"], {"content": content, "tool_call_id": _string()}, ["content"]),
    }


def _tool_shape() -> Schema:
    return {
        "type": "object",
        "properties": {
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "properties": {
                    "name": _string(minLength=1, maxLength=256),
                    "description": _string(),
                    "parameters": _ref("JsonSchema"),
                    "strict": {"type": "boolean"},
                },
                "required": ["name"],
                "additionalProperties": False,
            },
        },
        "required": ["type", "function"],
        "additionalProperties": False,
    }


def _set(schema: Schema, name: str, update: Callable[[Schema], None]) -> None:
    """Apply `update` to property `name` (to its non-null branch when it is optional), if it exists."""
    prop = schema.get("properties", {}).get(name)
    if prop is None:
        return
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    for branch in branches:
        update(branch)


def _caps(schema: Schema, model_name: str, config: ServeConfig) -> None:
    """The served model's name and this server's limits, where the body model has the field."""
    schema["properties"]["model"] = {"type": "string", "enum": [model_name]}

    def bound(name: str, maximum: int | None) -> None:
        def apply(branch: Schema) -> None:
            if branch.get("type") == "integer" and maximum is not None:
                branch["maximum"] = maximum

        _set(schema, name, apply)

    for name in ("max_tokens", "max_completion_tokens"):
        bound(name, config.max_tokens)
    bound("n", config.max_n)
    bound("top_logprobs", config.max_top_logprobs)
    if schema["title"] == CompletionRequest.__name__:
        bound("logprobs", config.max_top_logprobs)

    def stop(branch: Schema) -> None:
        if branch.get("type") == "string":
            branch.update(minLength=1, maxLength=config.max_stop_chars)
        elif branch.get("type") == "array":
            branch.update(maxItems=config.max_stop)
            branch["items"].update(minLength=1, maxLength=config.max_stop_chars)

    _set(schema, "stop", stop)

    def prompt(branch: Schema) -> None:  # a completion prompt is never empty
        if branch.get("type") == "string":
            branch["minLength"] = 1
        elif branch.get("type") == "array":
            branch.update(minItems=1, maxItems=config.max_n)
            branch["items"]["minLength"] = 1

    _set(schema, "prompt", prompt)


def request_schemas(model_name: str, config: ServeConfig) -> dict[str, Schema]:
    """components.schemas: every body model and every shape it refers to."""
    out: dict[str, Schema] = {
        "JsonSchema": _json_schema_shape(),
        "Tool": _tool_shape(),
        **_message_shapes(),
    }
    for model in BODY_MODELS.values():
        schema = model.model_json_schema(by_alias=True, ref_template=REF)
        out.update(schema.pop("$defs", {}))
        _caps(schema, model_name, config)
        out[model.__name__] = schema
    chat = out[ChatCompletionRequest.__name__]

    def messages(branch: Schema) -> None:
        branch["items"] = {"anyOf": [_ref(n) for n in _message_shapes()]}
        branch["maxItems"] = config.max_messages

    def tools(branch: Schema) -> None:
        branch["items"] = _ref("Tool")
        branch["maxItems"] = config.max_tools

    _set(chat, "messages", messages)
    _set(chat, "tools", tools)

    def json_schema(branch: Schema) -> None:
        branch.clear()
        branch.update(_ref("JsonSchema"))

    _set(out.get("JsonSchemaFormat", {}), "schema", json_schema)
    return out


def install_openapi(app: FastAPI, model_name: str, config: ServeConfig) -> None:
    """Make app.openapi() (served at app.openapi_url) declare the hand-parsed request bodies."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                description="OpenAI-, Anthropic- and Ollama-compatible API of qwenkit serve.",
                routes=app.routes,
            )
            doc.setdefault("components", {}).setdefault("schemas", {}).update(
                request_schemas(model_name, config)
            )
            for path, model in BODY_MODELS.items():
                operation = doc["paths"].get(path, {}).get("post")
                if operation is not None:
                    media = {"application/json": {"schema": _ref(model.__name__)}}
                    operation["requestBody"] = {"required": True, "content": media}
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
