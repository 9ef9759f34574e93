"""JSON schema → GBNF: integer bounds become a rule that admits exactly the integers in range."""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import pytest

from qwenkit.engines.grammar import (
    MAX_INT_DIGITS,
    grammar_from_json_schema,
    int_range_rule,
    unenforced_keywords,
)
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.engines.request import GenerationRequest, GrammarError
from qwenkit.engines.sampling import SamplingParams


def as_regex(rule: str) -> re.Pattern[str]:
    """The GBNF subset int_range_rule writes (literals, [a-b] classes, groups, |) as a Python regex."""
    out = []
    for token in re.findall(r'"[^"]*"|\[[^\]]*\]|[()|]|\S+', rule):
        if token.startswith('"'):
            out.append(re.escape(token[1:-1]))
        elif token.startswith("[") or token in "()|":
            out.append(token)
        else:
            raise AssertionError(f"unexpected GBNF token {token!r}")
    return re.compile("".join(out))


BOUNDS = [(0, 0), (3, 7), (1, 5), (-5, 5), (-120, -7), (-1, 0), (0, 9), (10, 99), (7, 1234), (95, 105)]
BOUNDS += [(-1000, 1000), (199, 2001), (0, None), (1, None), (150, None), (None, 0), (None, -3), (None, 250)]


@pytest.mark.parametrize(("lo", "hi"), BOUNDS)
def test_int_range_rule_admits_exactly_the_range(lo: int | None, hi: int | None) -> None:
    pattern = as_regex(int_range_rule(lo, hi))
    for n in range(-2500, 2500):
        inside = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert bool(pattern.fullmatch(str(n))) == inside, n
    # No leading zeros, no "-0", and unbounded sides reach the converter's own digit limit.
    for text in ("00", "01", "-0", "-01", "+1"):
        assert not pattern.fullmatch(text), text
    if hi is None:
        assert pattern.fullmatch("9" * MAX_INT_DIGITS)
    if lo is None:
        assert pattern.fullmatch("-" + "9" * MAX_INT_DIGITS)


def test_exclusive_and_fractional_bounds() -> None:
    schema = {"type": "integer", "exclusiveMinimum": 2, "maximum": 7.5}
    grammar = grammar_from_json_schema(schema)
    assert "root ::=" in grammar.gbnf
    pattern = as_regex(int_range_rule(3, 7))
    assert [n for n in range(0, 10) if pattern.fullmatch(str(n))] == [3, 4, 5, 6, 7]
    with pytest.raises(GrammarError, match="no integer lies between 6 and 5"):
        grammar_from_json_schema({"type": "integer", "minimum": 5.5, "exclusiveMaximum": 6})
    with pytest.raises(GrammarError, match="minimum must be a number"):
        grammar_from_json_schema({"type": "integer", "minimum": "3"})


def test_generated_json_keeps_integer_bounds_and_is_strict_json(demo_gguf: Callable[..., Path]) -> None:
    # Strings too: the converter's own string rule let raw control characters (invalid JSON) through.
    schema = {
        "type": "object",
        "properties": {
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
            "year": {"type": "integer", "minimum": 1990, "exclusiveMaximum": 2031},
            "delta": {"type": "integer", "minimum": -3, "maximum": 3},
            "note": {"type": "string", "maxLength": 12},
        },
        "required": ["stars", "year", "delta", "note"],
    }
    grammar = grammar_from_json_schema(schema, after_think=False)
    engine = LlamaCppEngine(
        demo_gguf("qwen3", "tiny", "f32"), EngineConfig(n_ctx=1024, max_seqs=4, threads=2)
    )
    try:
        for seed in range(8):
            params = SamplingParams(temperature=1.0, seed=seed, max_tokens=80)
            request = GenerationRequest(f"int{seed}", (1000 + seed, 2000, 3000), params, grammar=grammar)
            text = "".join(ev.text for ev in engine.generate_sync(request))
            answer = json.loads(text)  # strict: a raw control character in a string fails here
            assert 1 <= answer["stars"] <= 5 and 1990 <= answer["year"] <= 2030 and -3 <= answer["delta"] <= 3
    finally:
        engine.close()


def test_unenforced_keywords_are_named_and_property_names_are_not_keywords() -> None:
    schema = {
        "type": "object",
        "properties": {
            "not": {"type": "integer", "minimum": 0},  # a property called "not", bounded integer: fine
            "price": {"type": "number", "minimum": 0, "multipleOf": 0.01},
            "tags": {"type": "array", "items": {"type": "string", "format": "email"}, "uniqueItems": True},
            "when": {"type": "string", "format": "date"},
        },
        "required": ["not"],
        "$defs": {"if": {"type": "string"}},
    }
    assert unenforced_keywords(schema) == ["format: email", "minimum", "multipleOf", "uniqueItems"]
    assert unenforced_keywords({"type": "integer", "maximum": 3, "enum": [{"not": 1}]}) == []


def test_strings_refuse_raw_control_characters(demo_gguf: Callable[..., Path]) -> None:
    # Inside a JSON string a raw newline is invalid; an escaped one ("\n" as two characters) is fine.
    grammar = grammar_from_json_schema({"type": "object", "properties": {"note": {"type": "string"}}})
    engine = LlamaCppEngine(demo_gguf("qwen3", "tiny", "f32"), EngineConfig(n_ctx=256, max_seqs=1, threads=2))
    model = engine.model
    sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.gbnf.encode(), b"root")
    try:
        for token in model.tokenize('{"note": "a', parse_special=False):
            llama_cpp.llama_sampler_accept(sampler, token)
        candidates = [model.tokenize(text, parse_special=False) for text in ("\n", "\t", "b", "\\n")]
        assert all(len(ids) == 1 for ids in candidates)
        data = (llama_cpp.llama_token_data * len(candidates))(
            *[llama_cpp.llama_token_data(ids[0], 1.0, 0.0) for ids in candidates]
        )
        array = llama_cpp.llama_token_data_array(data, len(candidates), -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
        allowed = [data[i].logit > -1e30 for i in range(len(candidates))]
        assert allowed == [False, False, True, True]
    finally:
        llama_cpp.llama_sampler_free(sampler)
        engine.close()
