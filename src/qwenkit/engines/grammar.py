"""JSON schema → grammar for constrained decoding, with limits so a hostile schema cannot stall a server.

Contract: grammar_from_json_schema() checks the schema's size, depth and references (no recursion), then
converts it with llama.cpp's own JSON-schema-to-GBNF converter in a worker with a time limit; any failure is
a GrammarError with a one-line reason. json_object_grammar() is "any JSON object" (json_object mode).
The converter ignores integer bounds, so integers with minimum / maximum / exclusiveMinimum /
exclusiveMaximum get our own rule (int_range_rule) that admits exactly the integers in range.
unenforced_keywords() names what the grammar still cannot enforce (number bounds, multipleOf, uniqueItems,
...), so callers can say so instead of promising a valid answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from qwenkit.engines.request import Grammar, GrammarError

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 24
CONVERT_TIMEOUT_S = 5.0
MAX_INT_DIGITS = 16  # as the converter's own integer rule
_INT_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


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


_UNENFORCED = frozenset(
    {
        "multipleOf",
        "uniqueItems",
        "minProperties",
        "maxProperties",
        "patternProperties",
        "propertyNames",
        "contains",
        "minContains",
        "maxContains",
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)
_ENFORCED_FORMATS = frozenset({"date", "time", "date-time", "uuid", *(f"uuid{i}" for i in range(1, 6))})
_SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"})
_NOT_SCHEMAS = frozenset({"const", "enum", "default", "examples", "required"})


def unenforced_keywords(schema: Any) -> list[str]:
    """The JSON-schema keywords in `schema` that constrained decoding does not enforce, sorted."""
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, Mapping):
            return
        found.update(key for key in node if key in _UNENFORCED)
        if node.get("type") != "integer":  # bounds are enforced for integers only
            found.update(key for key in _INT_BOUNDS if key in node)
        fmt = node.get("format")
        if isinstance(fmt, str) and fmt not in _ENFORCED_FORMATS:
            found.add(f"format: {fmt}")
        for key, value in node.items():
            if key in _SCHEMA_MAPS and isinstance(value, Mapping):
                for sub in value.values():  # property names are not keywords
                    visit(sub)
            elif key not in _NOT_SCHEMAS:
                visit(value)

    visit(schema)
    return sorted(found)


def _same_length_range(lo: str, hi: str) -> str:
    """GBNF for the decimal strings of one length from lo to hi (lo <= hi), digit by digit."""
    if lo == hi:
        return f'"{lo}"'
    rest = len(lo) - 1
    any_rest = " [0-9]" * rest
    a, b = int(lo[0]), int(hi[0])
    if a == b:
        return f'"{lo[0]}" ({_same_length_range(lo[1:], hi[1:])})'
    low_full, high_full = lo[1:] == "0" * rest, hi[1:] == "9" * rest
    parts = [] if low_full else [f'"{a}" ({_same_length_range(lo[1:], "9" * rest)})']
    first, last = (a if low_full else a + 1), (b if high_full else b - 1)
    if first <= last:
        parts.append((f'"{first}"' if first == last else f"[{first}-{last}]") + any_rest)
    if not high_full:
        parts.append(f'"{b}" ({_same_length_range("0" * rest, hi[1:])})')
    return " | ".join(parts)


def _natural_range(lo: int, hi: int | None) -> list[str]:
    """Alternatives for the integers lo..hi (0 <= lo; hi None = unbounded), without leading zeros."""
    top = len(str(hi)) if hi is not None else MAX_INT_DIGITS
    out = []
    for length in range(len(str(lo)), top + 1):
        a = max(lo, 10 ** (length - 1) if length > 1 else 0)
        b = min(hi, 10**length - 1) if hi is not None else 10**length - 1
        if a <= b:
            out.append(f"({_same_length_range(str(a), str(b))})")
    return out


def int_range_rule(lo: int | None, hi: int | None) -> str:
    """GBNF (without trailing space) for exactly the integers in [lo, hi]; None = unbounded on that side."""
    if lo is not None and hi is not None and lo > hi:
        raise GrammarError(f"JSON schema: no integer lies between {lo} and {hi}")
    alts: list[str] = []
    if lo is None or lo < 0:  # negatives: "-" and a magnitude in [max(1, -hi), -lo]
        magnitude_lo = 1 if hi is None or hi >= 0 else -hi
        alts += [f'"-" {alt}' for alt in _natural_range(magnitude_lo, None if lo is None else -lo)]
    if hi is None or hi >= 0:
        alts += _natural_range(max(lo, 0) if lo is not None else 0, hi)
    return "(" + " | ".join(alts) + ")"


def _int_bounds(schema: Mapping[str, Any]) -> tuple[int | None, int | None]:
    def number(key: str) -> float | None:
        value = schema.get(key)
        if value is None or isinstance(value, bool):
            return None
        if not isinstance(value, int | float) or value != value or abs(value) > 10**MAX_INT_DIGITS:
            raise GrammarError(f"JSON schema: {key} must be a number within ±1e{MAX_INT_DIGITS}")
        return value

    bounds_lo = [math.ceil(v) for v in [number("minimum")] if v is not None]
    bounds_lo += [math.floor(v) + 1 for v in [number("exclusiveMinimum")] if v is not None]
    bounds_hi = [math.floor(v) for v in [number("maximum")] if v is not None]
    bounds_hi += [math.ceil(v) - 1 for v in [number("exclusiveMaximum")] if v is not None]
    return (max(bounds_lo) if bounds_lo else None), (min(bounds_hi) if bounds_hi else None)


# A JSON string character: llama-cpp-python's rule lets raw control characters through (invalid JSON).
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'


def _convert(schema_text: str) -> str:
    from llama_cpp.llama_grammar import RESERVED_NAMES, BuiltinRule, SchemaConverter

    class Converter(SchemaConverter):  # type: ignore[misc]
        def _add_primitive(self, name: str, rule: Any) -> str:
            return str(super()._add_primitive(name, BuiltinRule(_JSON_CHAR, []) if name == "char" else rule))

        def visit(self, schema: Any, name: str) -> str:
            if (
                isinstance(schema, dict)
                and schema.get("type") == "integer"
                and any(key in schema for key in _INT_BOUNDS)
            ):
                rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
                return str(self._add_rule(rule_name, int_range_rule(*_int_bounds(schema)) + " space"))
            return str(super().visit(schema, name))

    converter = Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(json.loads(schema_text), "stdin"), "")
    return str(converter.format_grammar())


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
