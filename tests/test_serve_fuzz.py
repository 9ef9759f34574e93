"""Schemathesis over the server's own OpenAPI document, against the real server on loopback (uvicorn,
llama.cpp, the tiny demo model): well over 1,000 generated requests, schema-valid and schema-breaking, must
get no 5xx (nor a server error inside a 200 stream) and no dropped or hung connection.

The document declares the request bodies (serve/openapi.py), so schemathesis builds real requests for every
wire API (OpenAI chat and completions, Anthropic messages, Ollama chat and generate, Responses with its
GET/DELETE, embeddings: positive and negative mode, weighted towards chat; embeddings go to a second server
on the embedding demo, the rest to the chat model); on top of that a third of the
chat bodies get a `response_format` json_schema and/or `tools` drawn from json_schemas() below: nested
objects, arrays, anyOf/oneOf/allOf, $defs and $ref chains, enums, odd property names, regex patterns and
formats, the shapes that reach the grammar compiler. Requests go out one at a time on fresh connections,
read to the end. Every failure is collected (not shrunk) and reported with its request body and the
server's traceback; the test prints the status counts.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from qwenkit.checkpoints.demo import create_demo
from qwenkit.checkpoints.resolve import resolve_model
from qwenkit.engines.loader import prepare_files
from qwenkit.gguf.convert import convert_to_gguf
from qwenkit.serve.config import ServeConfig
from serve_fixtures import API_KEY, LiveServer, live_server

pytestmark = pytest.mark.slow

CASES = 1200
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT_S = 60  # a request with no answer for this long is hung
# Small caps keep each generated request cheap; the document states them, so valid bodies respect them.
CONFIG = ServeConfig(
    api_keys=(API_KEY,),  # type: ignore[arg-type]
    max_tokens=4,
    max_n=2,
    max_top_logprobs=3,
    responses_store=8,
)
# Relative weights of the operations in the mix (chat is where the surface is; every wire API has a share).
WEIGHTS = {
    ("/v1/chat/completions", "POST"): 12,
    ("/v1/completions", "POST"): 4,
    ("/v1/messages", "POST"): 4,
    ("/api/chat", "POST"): 3,
    ("/api/generate", "POST"): 2,
    ("/v1/responses", "POST"): 4,
    ("/v1/responses/{response_id}", "GET"): 1,
    ("/v1/responses/{response_id}", "DELETE"): 1,
    ("/v1/embeddings", "POST"): 3,
    ("/v1/models", "GET"): 1,
    ("/v1/models/{model_id}", "GET"): 1,
    ("/health", "GET"): 1,
    ("/metrics", "GET"): 1,
}
# Sent to a second live server on the embedding demo (on the chat server the route only answers 400).
EMBEDDING_PATHS = ("/v1/embeddings",)

# ---- JSON-Schema-shaped values --------------------------------------------------------------------

NAMES = st.one_of(
    st.sampled_from(
        ["a", "id", "name", "city", "x-y", "with space", "ключ", "日付", "a\bb", "f\fg", "c\x01d"]
    ),
    st.text(min_size=1, max_size=8),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1000, 1000),
    st.floats(-1e6, 1e6, allow_nan=False),
    st.text(max_size=8),
)
PATTERNS = st.sampled_from(
    [
        r"^\w+@\w+\.com$",
        r"^[a-z]{2,5}$",
        r"\d+",
        r"^(ab|cd)*$",
        r"[^\x00-\x1f]+",
        "^\\b\\f$",
        "(",
        r"^.{0,3}$",
    ]
)
FORMATS = st.one_of(
    st.sampled_from(
        ["date", "date-time", "time", "email", "uuid", "uri", "ipv4", "日付", "", "a\r\nX-Injected: 1"]
    ),
    st.text(max_size=6),
)


def _leaf() -> st.SearchStrategy[dict[str, Any]]:
    number = st.fixed_dictionaries(
        {"type": st.sampled_from(["integer", "number"])},
        optional={"minimum": st.integers(-50, 50), "maximum": st.integers(-50, 50), "multipleOf": st.just(2)},
    )
    string = st.fixed_dictionaries(
        {"type": st.just("string")},
        optional={
            "minLength": st.integers(0, 4),
            "maxLength": st.integers(0, 12),
            "pattern": PATTERNS,
            "format": FORMATS,
            "description": st.text(max_size=10),
        },
    )
    return st.one_of(
        st.just({}),
        st.fixed_dictionaries({"type": st.sampled_from(["boolean", "null"])}),
        number,
        string,
        st.fixed_dictionaries({"enum": st.lists(SCALARS, min_size=1, max_size=4)}),
        st.fixed_dictionaries({"const": SCALARS}),
        st.fixed_dictionaries(
            {"$ref": st.sampled_from(["#/$defs/d0", "#/$defs/d1", "#/$defs/missing", "#"])}
        ),
    )


def _nest(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def with_required(properties: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        names = sorted(properties)
        return st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.just(properties)},
            optional={
                "required": st.lists(st.sampled_from(names), unique=True) if names else st.just([]),
                "additionalProperties": st.one_of(st.booleans(), children),
            },
        )

    return st.one_of(
        st.dictionaries(NAMES, children, max_size=4).flatmap(with_required),
        st.fixed_dictionaries(
            {"type": st.just("array"), "items": children},
            optional={"minItems": st.integers(0, 3), "maxItems": st.integers(0, 5)},
        ),
        st.fixed_dictionaries({"anyOf": st.lists(children, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"oneOf": st.lists(children, min_size=1, max_size=3)}),
        st.fixed_dictionaries({"allOf": st.lists(children, min_size=1, max_size=2)}),
        st.fixed_dictionaries({"type": st.just(["string", "null"])}),
    )


SUBSCHEMAS = st.recursive(_leaf(), _nest, max_leaves=10)


@st.composite
def json_schemas(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON Schema as clients write them (and some they should not): often with $defs, d0 → d1 chains."""
    schema = dict(draw(SUBSCHEMAS))
    if draw(st.booleans()):
        d1 = draw(SUBSCHEMAS)
        d0 = draw(
            st.one_of(SUBSCHEMAS, st.just({"type": "object", "properties": {"next": {"$ref": "#/$defs/d1"}}}))
        )
        schema["$defs"] = {"d0": d0, "d1": d1}
    return schema


@st.composite
def tool_lists(draw: st.DrawFn) -> list[dict[str, Any]]:
    names = draw(
        st.lists(st.sampled_from(["get_weather", "get_time", "search", "f"]), min_size=1, max_size=3)
    )
    return [
        {
            "type": "function",
            "function": {"name": name, "description": "a tool", "parameters": draw(json_schemas())},
        }
        for name in names
    ]


def shape_chat_body(body: dict[str, Any], draw: st.DrawFn) -> None:
    """Put schema-shaped response_format and tools (with a tool_choice) into a chat body, in place."""
    if draw(st.booleans()):
        fmt = {"name": "answer", "schema": draw(json_schemas()), "strict": draw(st.booleans())}
        body["response_format"] = {"type": "json_schema", "json_schema": fmt}
    if draw(st.booleans()):
        tools = draw(tool_lists())
        body["tools"] = tools
        named = {"type": "function", "function": {"name": tools[0]["function"]["name"]}}
        body["tool_choice"] = draw(st.sampled_from(["none", "auto", "required", named]))


# ---- running -------------------------------------------------------------------------------------


class ServerErrors(logging.Handler):
    """The server's error log records (tracebacks included), to attach to the request that caused them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.guard = threading.Lock()  # not `lock`: logging.Handler holds its own while emit() runs
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        with self.guard:
            self.lines.append(line)

    def take(self) -> list[str]:
        with self.guard:
            out, self.lines = self.lines, []
        return out


def stream_errors(response: requests.Response) -> list[dict[str, Any]]:
    """Server errors sent inside a 200 event stream (the status was already sent)."""
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        return []
    found = []
    for line in response.text.splitlines():
        if line.startswith("data: {"):
            data = json.loads(line[len("data: ") :])
            error = data.get("error") if isinstance(data, dict) else None
            if isinstance(data, dict) and data.get("type") == "error" and "code" in data:
                error = {"type": data["code"], **data}  # a Responses stream's error event is flat
            # The types a 5xx status gets (serve/errors.py; Anthropic's api_error): what the stream says
            # instead of a status.
            if isinstance(error, dict) and error.get("type") in (
                "server_error",
                "overloaded_error",
                "api_error",
            ):
                found.append(error)
    return found


@pytest.fixture(scope="module")
def server(demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path]) -> Iterator[LiveServer]:
    gguf, checkpoint = demo_gguf("qwen3", "tiny", "f32"), demo_checkpoint("qwen3", "tiny")
    with live_server(gguf, checkpoint, CONFIG, n_ctx=2048, max_seqs=4) as live:
        yield live


@pytest.fixture(scope="module")
def embedding_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    checkpoint = create_demo(tmp_path_factory.mktemp("fuzz-emb") / "emb", embedding=True)
    gguf = convert_to_gguf(checkpoint, checkpoint.parent / "emb-f32.gguf", "f32")
    files = prepare_files(resolve_model(str(gguf)))
    with live_server(gguf, checkpoint, CONFIG, n_ctx=512, max_seqs=2, embedding=files.embedding) as live:
        yield live


@pytest.mark.timeout(1500)
def test_schemathesis_finds_no_5xx_and_no_dropped_connection(
    server: LiveServer, embedding_server: LiveServer
) -> None:
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json", headers=AUTH, timeout=30)
    strategies = []
    for (path, method), weight in WEIGHTS.items():
        operation = schema[path][method]
        strategies += [operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE)] * weight
        strategies += [operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE)] * (
            (weight + 1) // 2
        )
    cases = st.sampled_from(strategies).flatmap(lambda strategy: strategy)
    errors = ServerErrors()
    logging.getLogger().addHandler(errors)
    statuses: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    sent = [0]

    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def one(data: st.DataObject) -> None:
        case = data.draw(cases)
        chat_body = case.operation.path == "/v1/chat/completions" and isinstance(case.body, dict)
        if chat_body and data.draw(st.integers(0, 2)) == 0:
            shape_chat_body(case.body, data.draw)
        label = f"{case.method} {case.operation.path}"
        if chat_body:
            fmt = case.body.get("response_format")
            statuses["with json_schema"] += isinstance(fmt, dict) and isinstance(fmt.get("json_schema"), dict)
            statuses["with tools"] += bool(case.body.get("tools"))
        errors.take()
        sent[0] += 1
        # Sent by hand, not case.call(): schemathesis retries dropped connections and cuts streams short.
        # A fresh connection each time, so a keep-alive the server closed while idle is not a "drop".
        target = embedding_server if case.operation.path in EMBEDDING_PATHS else server
        request = case.as_transport_kwargs(base_url=target.base_url, headers=AUTH)
        try:
            response = requests.request(**{**request, "timeout": TIMEOUT_S})
        except requests.RequestException as exc:
            statuses["dropped"] += 1
            failures.append(f"{label}: no response ({type(exc).__name__}: {exc})\n{_body(case)}")
            return
        statuses[str(response.status_code)] += 1
        in_stream = stream_errors(response)
        if response.status_code >= 500 or in_stream:
            what = in_stream or response.text[:300]
            trace = "\n".join(errors.take())[-3000:]
            failures.append(f"{label}: {response.status_code} {what}\n{_body(case)}\nserver log:\n{trace}")

    try:
        one()
    finally:
        logging.getLogger().removeHandler(errors)
    print(f"\nfuzz: {sent[0]} requests, statuses {dict(sorted(statuses.items()))}")
    assert sent[0] >= 1000, f"only {sent[0]} requests were generated"
    assert not failures, f"{len(failures)} of {sent[0]} requests failed:\n\n" + "\n\n".join(failures[:8])


def _body(case: schemathesis.Case) -> str:
    body = json.dumps(case.body, ensure_ascii=True) if isinstance(case.body, dict | list) else repr(case.body)
    return f"body: {body[:2000]}"
