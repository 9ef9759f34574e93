"""JSON schema → GBNF: integer bounds, $ref DAGs and chains, patterns and odd names, checked on llama.cpp's
grammar sampler; the compile's time limit kills its worker."""

from __future__ import annotations

import ctypes
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import llama_cpp
import pytest

from qwenkit.chat.messages import Tool
from qwenkit.engines import grammar as grammar_module
from qwenkit.engines.grammar import (
    MAX_INT_DIGITS,
    grammar_from_json_schema,
    int_range_rule,
    unenforced_keywords,
)
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.engines.request import GenerationRequest, Grammar, GrammarError
from qwenkit.engines.sampling import SamplingParams
from qwenkit.serve.tools import GrammarCache, tool_call_grammar


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


@pytest.mark.slow  # 11-15 s
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


# ---- linear-time $ref walks, $defs chains, a time limit that kills, patterns and odd names ---------------


@pytest.fixture(scope="module")
def tiny_model(demo_gguf: Callable[..., Path]) -> Iterator[Any]:
    engine = LlamaCppEngine(demo_gguf("qwen3", "tiny", "f32"), EngineConfig(n_ctx=256, max_seqs=1, threads=2))
    try:
        yield engine.model
    finally:
        engine.close()


def admits(model: Any, gbnf: str, text: str, complete: bool = True) -> bool:
    """Whether llama.cpp's grammar sampler lets the model write `text` (and then stop, when complete)."""
    sampler = llama_cpp.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")
    assert sampler, "llama.cpp could not parse the grammar"
    try:
        end = [model.eog_ids[0]] if complete else []
        for token in [*model.tokenize(text, parse_special=False), *end]:
            data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 1.0, 0.0))
            array = llama_cpp.llama_token_data_array(data, 1, -1, False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
            if data[0].logit < -1e30:
                return False
            if token != model.eog_ids[0]:
                llama_cpp.llama_sampler_accept(sampler, token)
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


class CountingDict(dict):  # type: ignore[type-arg]
    """A schema node that counts how often a walk reads it."""

    reads = 0

    def items(self) -> Any:
        self.reads += 1
        return super().items()

    def __getitem__(self, key: Any) -> Any:
        self.reads += 1
        return super().__getitem__(key)


def dag_schema(levels: int, sep: str = "", node: type = dict) -> dict[str, Any]:
    """$defs d0..dN, each an object whose two properties both $ref the next: 2**N paths, N+1 defs."""
    defs = {
        f"d{sep}{i}": node(
            type="object",
            properties={"a": {"$ref": f"#/$defs/d{sep}{i + 1}"}, "b": {"$ref": f"#/$defs/d{sep}{i + 1}"}},
            required=["a", "b"],
            additionalProperties=False,
        )
        for i in range(levels)
    }
    defs[f"d{sep}{levels}"] = node(type="integer", minimum=1, maximum=3)
    return {"$defs": defs, "$ref": f"#/$defs/d{sep}0"}


def nested(levels: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(levels):
        value = {"a": value, "b": value}
    return value


def test_ref_walk_reads_each_def_a_bounded_number_of_times() -> None:
    # Before: each $ref was followed again on every path, 2**14 reads of the last def.
    schema = dag_schema(14, node=CountingDict)
    grammar_from_json_schema(schema)
    reads = {name: node.reads for name, node in schema["$defs"].items()}
    assert max(reads.values()) <= 8, reads


def test_converter_visits_each_def_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # llama-cpp-python found a $def's finished rule by its raw name, so "d_1" (rule "d-1") never matched and
    # the converter walked every path of the DAG too.
    from llama_cpp.llama_grammar import SchemaConverter

    calls: list[str] = []
    original = SchemaConverter.visit

    def counting(self: Any, schema: Any, name: str) -> Any:
        calls.append(name)
        return original(self, schema, name)

    monkeypatch.setattr(SchemaConverter, "visit", counting)
    gbnf = grammar_module._convert(json.dumps(dag_schema(14, sep="_")))
    assert max(calls.count(f"d_{i}") for i in range(15)) == 1
    assert len(calls) < 10 * 15
    assert len(re.findall(r"^d-\d+ ::=", gbnf, re.MULTILINE)) == 15  # one rule per def


def test_22_level_defs_dag_compiles_and_constrains(tiny_model: Any) -> None:
    # 2**22 paths through 23 defs: compiles well inside the time limit (no "took over" GrammarError).
    schema = dag_schema(22)
    grammar = grammar_from_json_schema(schema, after_think=False)
    small = dag_schema(3)
    small_grammar = grammar_from_json_schema(small, after_think=False)
    assert admits(tiny_model, small_grammar.gbnf, json.dumps(nested(3, 2)))
    assert not admits(tiny_model, small_grammar.gbnf, json.dumps(nested(3, 5)))  # out of the leaf's range
    assert not admits(tiny_model, small_grammar.gbnf, json.dumps(nested(2, 2)))  # one level short
    path = '{"a": ' * 22 + "3"
    assert admits(tiny_model, grammar.gbnf, path, complete=False)
    assert not admits(tiny_model, grammar.gbnf, '{"a": ' * 21 + "3", complete=False)


def test_defs_chain_beside_a_root_ref_compiles_and_constrains(tiny_model: Any) -> None:
    # Refused as "does not compile" before: upstream's resolve_refs skipped the siblings of a root $ref.
    defs: dict[str, Any] = {
        f"Level_{i}": {
            "type": "object",
            "properties": {"next": {"$ref": f"#/$defs/Level_{i + 1}"}},
            "required": ["next"],
            "additionalProperties": False,
        }
        for i in range(4)
    }
    defs["Level_4"] = {"$ref": "#/$defs/Leaf"}  # a def that is only a $ref, as pydantic writes aliases
    defs["Leaf"] = {"type": "string", "enum": ["x", "y"]}
    schema = {"$ref": "#/$defs/Level_0", "$defs": defs}
    grammar = grammar_from_json_schema(schema, after_think=False)
    chain = lambda levels, leaf: json.dumps(nested_chain(levels, leaf))  # noqa: E731
    assert admits(tiny_model, grammar.gbnf, chain(4, "x"))
    assert not admits(tiny_model, grammar.gbnf, chain(4, "z"))
    assert not admits(tiny_model, grammar.gbnf, chain(3, "x"))
    # The same schema as a tool's parameters, forced by tool_choice.
    tool = Tool.model_validate({"type": "function", "function": {"name": "walk", "parameters": schema}})
    tool_grammar = tool_call_grammar([tool], parallel=False)
    assert "Level" in tool_grammar.gbnf or "level" in tool_grammar.gbnf.lower()


def nested_chain(levels: int, leaf: Any) -> Any:
    value = leaf
    for _ in range(levels):
        value = {"next": value}
    return value


def test_pydantic_nested_models_compile_and_constrain(tiny_model: Any) -> None:
    from pydantic import BaseModel

    class Street(BaseModel):
        name: str
        number: int

    class Address(BaseModel):
        street: Street
        city: str

    class Person(BaseModel):
        home: Address
        work: Address | None = None

    grammar = grammar_from_json_schema(Person.model_json_schema(), after_think=False)
    person = Person(home=Address(street=Street(name="Main", number=3), city="Oslo"))
    assert admits(tiny_model, grammar.gbnf, person.model_dump_json(exclude_none=True))
    assert not admits(tiny_model, grammar.gbnf, '{"home": {"street": {"name": "Main"}, "city": "Oslo"}}')


def test_recursion_and_bad_refs_are_still_refused() -> None:
    with pytest.raises(GrammarError, match="recursive"):
        grammar_from_json_schema({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}})
    with pytest.raises(GrammarError, match="recursive"):
        grammar_from_json_schema({"properties": {"x": {"properties": {"y": {"$ref": "#/properties/x"}}}}})
    with pytest.raises(GrammarError, match="points nowhere"):
        grammar_from_json_schema({"properties": {"x": {"$ref": "#/$defs/missing"}}})
    with pytest.raises(GrammarError, match="remote refs"):
        grammar_from_json_schema({"properties": {"x": {"$ref": "https://example.com/s.json"}}})
    long_chain = {f"c{i}": {"$ref": f"#/$defs/c{i + 1}"} for i in range(80)}
    long_chain["c80"] = {"type": "string"}
    with pytest.raises(GrammarError, match="nest more than"):
        grammar_from_json_schema({"$defs": long_chain, "$ref": "#/$defs/c0"})


def test_time_limit_kills_a_stuck_compile_and_the_next_one_works(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    monkeypatch.setattr(grammar_module, "_CONVERT", ("grammar_stuck", "stuck_convert"))
    monkeypatch.setattr(grammar_module, "CONVERT_TIMEOUT_S", 1.0)
    with pytest.raises(GrammarError, match="took over 1 s to compile"):
        grammar_from_json_schema({"type": "string", "description": str(pid_file)})
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not left running
    monkeypatch.undo()
    assert "root ::=" in grammar_from_json_schema({"type": "string", "description": "after"}).gbnf


class SignallingKey(str):
    """A cache key that says when the cache reads it."""

    arrived = threading.Event()

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        SignallingKey.arrived.set()
        return str(self).encode(*args, **kwargs)


def test_grammar_cache_builds_a_key_once_and_serves_others_meanwhile() -> None:
    cache = GrammarCache()
    started, release = threading.Event(), threading.Event()
    builds: list[str] = []

    def slow() -> Grammar:
        builds.append("k")
        started.set()
        release.wait(30)
        return Grammar(gbnf='root ::= "a"')

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(cache.get, "k", slow)
        assert started.wait(30)
        second = pool.submit(cache.get, SignallingKey("k"), slow)  # waits for the build under way
        # Not blocked by that build (the lock is not held while compiling).
        assert cache.get("other", lambda: Grammar(gbnf='root ::= "b"')).gbnf == 'root ::= "b"'
        assert SignallingKey.arrived.wait(30)
        time.sleep(0.1)  # from hashing the key to finding the build under way
        release.set()
        assert first.result(30) is second.result(30)
    assert builds == ["k"]


def test_compiles_from_many_threads_at_once() -> None:
    schemas = [
        {"type": "object", "properties": {f"p{i}": {"type": "integer", "maximum": i}}} for i in range(8)
    ]
    with ThreadPoolExecutor(8) as pool:
        grammars = list(pool.map(grammar_from_json_schema, schemas))
    for i, grammar in enumerate(grammars):
        assert f'"\\"p{i}\\""' in grammar.gbnf


# Patterns: llama.cpp's grammar must admit exactly the JSON strings Python's regex search accepts.
PATTERNS = [
    r"^\w+@\w+\.com$",
    r"^\d{3}-\d{2,4}$",
    r"^[A-Z][a-z]*(\s[A-Z][a-z]*)*$",
    r'^a"b\\c$',
    r"^[^,]+$",
    r"abc",
    r"^(foo|bar)?baz$",
    r"^\S+$",
    r"^[\w.\-]+$",
    r"^x{2,3}$",
    r"^(?:ab)+$|^z",
    r"^[\x41-\x43\u00e9]\t?$",
    r"^.+\.$",
]
SAMPLES = [
    "a@b.com", "joe_1@mail.com", "a@b.co", "a@b.comx", "@b.com", "a b@c.com", "123-45", "123-4567",
    "123-45678", "12-345", "Hello World", "Hello world", "Hello", "", 'a"b\\c', "a\"b\\\\c", "x,y", "xy",
    "a\nb", "a\x01b", "xxabcxx", "abc", "ab", "baz", "foobaz", "barbaz", "foobarbaz", "a.b-c_d", "a b", "xx",
    "xxx", "x", "xxxx", "abab", "ab", "zq", "qz", "A", "C\t", "é", "D", "end.", "a\"\\.", "\n.",
]  # fmt: skip


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_compile_and_admit_exactly_the_matching_strings(tiny_model: Any, pattern: str) -> None:
    schema = {
        "type": "object",
        "properties": {"v": {"type": "string", "pattern": pattern}},
        "required": ["v"],
    }
    gbnf = grammar_from_json_schema(schema, after_think=False).gbnf
    assert unenforced_keywords(schema) == []
    for sample in SAMPLES:
        text = json.dumps({"v": sample}, ensure_ascii=False)
        # re.ASCII: JSON schema's regexes are ECMAScript's, whose \w and \d are ASCII only.
        assert admits(tiny_model, gbnf, text) == bool(re.search(pattern, sample, re.ASCII)), (sample, gbnf)


@pytest.mark.parametrize(
    "pattern", [r"^(?=a)\w+$", r"\bword\b", r"^(a)\1$", r"^\p{L}+$", r"^(a*)*$", r"^a{5000}$"]
)
def test_patterns_grammar_cannot_say_compile_without_them_and_are_named(
    tiny_model: Any, pattern: str
) -> None:
    schema = {
        "type": "object",
        "properties": {"v": {"type": "string", "pattern": pattern}},
        "required": ["v"],
    }
    gbnf = grammar_from_json_schema(schema, after_think=False).gbnf
    assert unenforced_keywords(schema) == ["pattern"]
    assert admits(tiny_model, gbnf, '{"v": "anything"}')
    assert not admits(tiny_model, gbnf, '{"v": 3}')


ODD = ["a\bb", "f\fx", "c\x01d", 'q"uote', "back\\slash", "", "日付", "😀", "tab\there", "new\nline", "root"]


def test_odd_property_names_and_enum_values_compile_and_constrain(tiny_model: Any) -> None:
    # \b, \f and \x01 made GBNF llama.cpp could not parse; a quote or backslash broke the literal.
    schema = {
        "type": "object",
        "properties": {name: {"enum": [name, "plain"]} for name in ODD},
        "required": ODD,
        "additionalProperties": False,
    }
    gbnf = grammar_from_json_schema(schema, after_think=False).gbnf
    assert admits(tiny_model, gbnf, json.dumps({name: name for name in ODD}, ensure_ascii=False))
    assert admits(tiny_model, gbnf, json.dumps({name: "plain" for name in ODD}, ensure_ascii=False))
    wrong = {name: name for name in ODD} | {"c\x01d": "c\x02d"}
    assert not admits(tiny_model, gbnf, json.dumps(wrong, ensure_ascii=False))
    raw = json.dumps({name: name for name in ODD}, ensure_ascii=False).replace("\\u0001", "\x01")
    assert not admits(tiny_model, gbnf, raw)  # a raw control character is not JSON
    for name in ODD:  # const too, one property at a time
        one = {"type": "object", "properties": {name: {"const": name}}, "required": [name]}
        assert admits(
            tiny_model,
            grammar_from_json_schema(one, after_think=False).gbnf,
            json.dumps({name: name}, ensure_ascii=False),
        ), name
