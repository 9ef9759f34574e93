"""JSON schema → grammar for constrained decoding, with limits so a hostile schema cannot stall a server.

Contract: grammar_from_json_schema() checks the schema's size, depth and references (no recursion), then
converts it with llama.cpp's own JSON-schema-to-GBNF converter in a worker with a time limit; any failure is
a GrammarError with a one-line reason. json_object_grammar() is "any JSON object" (json_object mode).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from qwenkit.engines.request import Grammar, GrammarError

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 24
CONVERT_TIMEOUT_S = 5.0


def _check_shape(node: Any, depth: int = 0) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise GrammarError(f"JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels; flatten it")
    if isinstance(node, Mapping):
        ref = node.get("$ref")
        if ref is not None and (not isinstance(ref, str) or not ref.startswith("#/")):
            raise GrammarError(
                "JSON schema $ref must point inside the schema (#/...); remote refs are refused"
            )
        for value in node.values():
            _check_shape(value, depth + 1)
    elif isinstance(node, list):
        for value in node:
            _check_shape(value, depth + 1)


def _resolve(schema: Mapping[str, Any], ref: str) -> Any:
    node: Any = schema
    for part in ref[2:].split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise GrammarError(f"JSON schema $ref {ref!r} points nowhere")
        node = node[part]
    return node


def _check_no_recursion(schema: Mapping[str, Any]) -> None:
    # A $ref cycle would make an unbounded grammar; refuse it instead of looping in the converter.
    def visit(node: Any, stack: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            ref = node.get("$ref")
            if isinstance(ref, str):
                if ref in stack:
                    raise GrammarError(
                        f"JSON schema is recursive through {ref!r}; recursive schemas are refused"
                    )
                visit(_resolve(schema, ref), (*stack, ref))
            for key, value in node.items():
                if key != "$ref":
                    visit(value, stack)
        elif isinstance(node, list):
            for value in node:
                visit(value, stack)

    visit(schema, ())


def _convert(schema_text: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(schema_text)


def grammar_from_json_schema(schema: Any, after_think: bool = True) -> Grammar:
    if not isinstance(schema, Mapping):
        raise GrammarError("JSON schema must be an object")
    text = json.dumps(schema, ensure_ascii=False)
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"JSON schema is larger than {MAX_SCHEMA_BYTES // 1024} KiB")
    _check_shape(schema)
    _check_no_recursion(schema)
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        gbnf = pool.submit(_convert, text).result(timeout=CONVERT_TIMEOUT_S)
    except FutureTimeout:
        raise GrammarError(
            f"JSON schema took over {CONVERT_TIMEOUT_S:.0f} s to compile; simplify it"
        ) from None
    except GrammarError:
        raise
    except Exception as exc:  # the converter raises assorted errors for schemas it cannot handle
        raise GrammarError(f"JSON schema does not compile: {str(exc).splitlines()[0][:200]}") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return Grammar(gbnf=gbnf, after_think=after_think, json_schema=text)


def json_object_grammar(after_think: bool = True) -> Grammar:
    """Any JSON object."""
    return grammar_from_json_schema({"type": "object"}, after_think)
