"""JSON schema → grammar for constrained decoding, with limits so a hostile schema cannot stall a server.

Contract: grammar_from_json_schema() checks the schema's size, depth and $refs (local only, no recursion,
chains at most MAX_REF_CHAIN deep) in time linear in the schema, then converts it with llama.cpp's own
JSON-schema-to-GBNF converter (our subclass: one rule per $ref target, $defs beside a root $ref, literals
escaped for GBNF) in a worker process that CONVERT_TIMEOUT_S really stops (the worker is killed and
replaced); any failure is a GrammarError with a one-line reason. It blocks its caller (thread-safe; at
most MAX_COMPILE_WORKERS compile at once): servers call it off the event loop.
json_object_grammar() is "any JSON object" (json_object mode).
The converter ignores integer bounds, so integers with minimum / maximum / exclusiveMinimum /
exclusiveMaximum get our own rule (int_range_rule) that admits exactly the integers in range. String
`pattern`s are translated by pattern_gbnf() (ECMAScript regex: \\d \\w \\s, classes, groups, {n,m}) so the
JSON text written decodes to a match; a pattern it cannot express is left out, not refused.
unenforced_keywords() names what the grammar still cannot enforce (number bounds, multipleOf, uniqueItems,
such a pattern, ...), so callers can say so instead of promising a valid answer.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

from qwenkit.engines.process_pool import ProcessPool, WorkerCrashed, WorkerError, WorkerTimeout
from qwenkit.engines.request import Grammar, GrammarError

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 24
CONVERT_TIMEOUT_S = 5.0
MAX_REF_CHAIN = 64  # $refs followed one inside another: the converter recurses per level
MAX_INT_DIGITS = 16  # as the converter's own integer rule
_INT_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _ref_path(schema: Mapping[str, Any], ref: str) -> tuple[str | int, ...]:
    """The path of the node a local $ref ("#/a/b~1c/0") points at, as the keys that reach it."""
    node: Any = schema
    path: list[str | int] = []
    for raw in ref[2:].split("/"):
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part not in node:  # a pointer in a URI fragment may be %-encoded
            part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            key: str | int = int(part)
        elif isinstance(node, Mapping) and part in node:
            key = part
        else:
            raise GrammarError(f"JSON schema $ref {ref!r} points nowhere")
        node = node[key]
        path.append(key)
    if not isinstance(node, Mapping):
        raise GrammarError(f"JSON schema $ref {ref!r} must point at a schema object")
    return tuple(path)


def _check_schema(schema: Mapping[str, Any]) -> None:
    """Depth and $ref checks in time linear in the schema: one walk of the document, then one walk of the
    graph "ref target -> refs inside it". A cycle there (recursion) would make an unbounded grammar."""
    refs_at: dict[tuple[str | int, ...], list[tuple[str | int, ...]]] = {}  # node path -> targets of its refs
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(schema, ())]
    while stack:
        node, path = stack.pop()
        if len(path) > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels; flatten it")
        if isinstance(node, Mapping):
            ref = node.get("$ref")
            if ref is not None:
                if not isinstance(ref, str) or not ref.startswith("#/"):
                    raise GrammarError(
                        "JSON schema $ref must point inside the schema (#/...); remote refs are refused"
                    )
                refs_at.setdefault(path, []).append(_ref_path(schema, ref))
            stack.extend((value, (*path, key)) for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((value, (*path, i)) for i, value in enumerate(node))
    # The refs inside a target's subtree: each ref is filed under every prefix of its path (depth-bounded).
    inside: dict[tuple[str | int, ...], list[tuple[str | int, ...]]] = {}
    for path, targets in refs_at.items():
        for cut in range(len(path) + 1):
            inside.setdefault(path[:cut], []).extend(targets)
    chain: dict[tuple[str | int, ...], int] = {}  # target -> longest run of refs from it (done)
    for start in {t for targets in refs_at.values() for t in targets}:
        if start in chain:
            continue
        on_path = {start}
        todo: list[tuple[tuple[str | int, ...], int]] = [(start, 0)]
        while todo:  # iterative depth-first search; each target is finished once
            target, i = todo[-1]
            nexts = inside.get(target, [])
            if i < len(nexts):
                todo[-1] = (target, i + 1)
                nxt = nexts[i]
                if nxt in on_path:
                    ref = "#/" + "/".join(str(k).replace("~", "~0").replace("/", "~1") for k in nxt)
                    raise GrammarError(
                        f"JSON schema is recursive through {ref!r}; recursive schemas are refused"
                    )
                if nxt not in chain:
                    on_path.add(nxt)
                    todo.append((nxt, 0))
                continue
            todo.pop()
            on_path.discard(target)
            chain[target] = 1 + max((chain[n] for n in nexts), default=0)
            if chain[target] > MAX_REF_CHAIN:
                raise GrammarError(f"JSON schema $refs nest more than {MAX_REF_CHAIN} deep; flatten it")


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
        if "pattern" in node and node.get("type") in (None, "string"):
            if not _pattern_enforced(node["pattern"]):
                found.add("pattern")  # compiled without it
            else:  # the pattern's rule replaces the string's length and format rules
                found.update(key for key in ("minLength", "maxLength") if key in node)
                if isinstance(fmt, str):
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


# ---- regex `pattern` -> GBNF for the JSON text of a matching string --------------------------------------
# llama.cpp's GBNF has no \w \d \s, no lookaround and few escapes, and llama-cpp-python's own translation
# copies regex text into GBNF (so `\.` or `\w` do not compile) and lets raw `"` and control characters into
# the JSON string. This one works on characters: each one the regex admits is written as JSON writes it
# (`"` as \", control characters escaped), so the answer stays valid JSON and decodes to a match.

_Ranges = tuple[tuple[int, int], ...]
_MAX_CP = 0x10FFFF
_DIGIT: _Ranges = ((0x30, 0x39),)
_WORD: _Ranges = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_SPACE: _Ranges = ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A))
_SPACE += ((0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF))
_NEWLINES: _Ranges = ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))  # what an ECMAScript `.` refuses
# Written escaped in a JSON string (DEL too, as the string rule below)
_JSON_SPECIAL: _Ranges = ((0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0x7F, 0x7F))
_CLASS_ESCAPES = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
_CHAR_ESCAPES = {"t": 0x09, "n": 0x0A, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}
_JSON_SHORT = {0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r", 0x22: '\\"', 0x5C: "\\\\"}
MAX_PATTERN_REPEAT = 1000  # the sum of a pattern's {n,m} counts: llama.cpp expands each copy


class _Unsupported(ValueError):
    """A regex feature the grammar cannot express; the pattern is then not enforced."""


def _normalize(ranges: Any) -> _Ranges:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def _complement(ranges: _Ranges) -> _Ranges:
    out, low = [], 0
    for lo, hi in ranges:
        if lo > low:
            out.append((low, lo - 1))
        low = hi + 1
    if low <= _MAX_CP:
        out.append((low, _MAX_CP))
    return tuple(out)


def _intersect(a: _Ranges, b: _Ranges) -> _Ranges:
    return _normalize((max(p, r), min(q, s)) for p, q in a for r, s in b if max(p, r) <= min(q, s))


def _gbnf_char(cp: int) -> str:
    """One code point inside GBNF [...]: letters and digits as they are, anything else escaped."""
    if cp < 0x80 and chr(cp).isalnum():
        return chr(cp)
    return f"\\x{cp:02X}" if cp < 0x100 else f"\\u{cp:04X}" if cp < 0x10000 else f"\\U{cp:08X}"


def _gbnf_literal(text: str) -> str:
    """A GBNF literal matching `text` exactly: `"`, `\\` and unprintable characters escaped."""
    body = "".join("\\" + c if c in '"\\' else c if c.isprintable() else _gbnf_char(ord(c)) for c in text)
    return f'"{body}"'


def _json_char(cp: int) -> str:
    """The character as a JSON string writes it (escaped only where JSON requires)."""
    return _JSON_SHORT.get(cp) or (f"\\u{cp:04x}" if cp < 0x20 or cp == 0x7F else chr(cp))


def _set_gbnf(ranges: _Ranges) -> str:
    """GBNF for one character of the set as JSON writes it: plain ones in one class, the rest escaped."""
    plain = _intersect(ranges, _complement(_JSON_SPECIAL))
    alts = ["[" + "".join(_gbnf_char(a) + ("" if a == b else "-" + _gbnf_char(b)) for a, b in plain) + "]"]
    alts = alts if plain else []
    alts += [
        _gbnf_literal(_json_char(cp)) for a, b in _intersect(ranges, _JSON_SPECIAL) for cp in range(a, b + 1)
    ]
    if not alts:
        raise _Unsupported("a character class that admits nothing")
    return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"


class _PatternParser:
    """An ECMAScript regex (the JSON-schema dialect) -> GBNF; _Unsupported for what GBNF cannot say.
    Each part is parsed to (GBNF, can match the empty string); sets that need several alternatives become
    rules through `add_rule`, so `.` costs one rule however often it appears."""

    def __init__(self, pattern: str, any_char: str, add_rule: Callable[[str], str]) -> None:
        self.p, self.i, self.repeats = pattern, 0, 0
        self.any_char, self.add_rule = any_char, add_rule

    def peek(self, n: int = 0) -> str:
        return self.p[self.i + n] if self.i + n < len(self.p) else ""

    def parse(self) -> str:
        # Anchors only at the ends of top-level alternatives; an unanchored side matches any text.
        alts = []
        while True:
            start = self.peek() == "^"
            self.i += start
            body, _ = self.sequence(top=True)
            end = self.peek() == "$"
            self.i += end
            alts.append(
                " ".join(
                    [*(() if start else (f"{self.any_char}*",)), body]
                    + ([] if end else [f"{self.any_char}*"])
                )
            )
            if self.peek() != "|":
                break
            self.i += 1
        if self.i < len(self.p):
            raise _Unsupported(f"{self.peek()!r} at offset {self.i}")
        return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"

    def alternatives(self) -> tuple[str, bool]:
        alts = [self.sequence(top=False)]
        while self.peek() == "|":
            self.i += 1
            alts.append(self.sequence(top=False))
        gbnf = alts[0][0] if len(alts) == 1 else "(" + " | ".join(a for a, _ in alts) + ")"
        return gbnf, any(empty for _, empty in alts)

    def sequence(self, top: bool) -> tuple[str, bool]:
        items: list[str] = []
        empty, joinable = True, False
        while self.peek() not in ("", "|", ")") and not (top and self.peek() == "$" and self.peek(1) in "|"):
            atom, atom_empty = self.atom()
            item, item_empty = self.quantified(atom, atom_empty)
            if joinable and item.startswith('"') and item.endswith('"'):  # "a" "b" -> "ab"
                items[-1] = items[-1][:-1] + item[1:]
            else:
                items.append(item)
            joinable = item.startswith('"') and item.endswith('"')
            empty = empty and item_empty
        return (" ".join(items) if items else '""'), empty

    def set_rule(self, ranges: _Ranges) -> str:
        if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:  # one character (`\.`): a literal
            return _gbnf_literal(_json_char(ranges[0][0]))
        gbnf = _set_gbnf(ranges)
        return self.add_rule(gbnf) if gbnf.startswith("(") else gbnf

    def atom(self) -> tuple[str, bool]:
        c = self.peek()
        self.i += 1
        if c == "(":
            if self.peek() == "?":
                named = self.p.startswith(("?<", "?P<"), self.i) and not self.p.startswith(
                    ("?<=", "?<!"), self.i
                )
                if self.p.startswith("?:", self.i):
                    self.i += 2
                elif named and ">" in self.p[self.i :]:
                    self.i = self.p.index(">", self.i) + 1
                else:
                    raise _Unsupported("lookaround or inline flags")
            inner, empty = self.alternatives()
            if self.peek() != ")":
                raise _Unsupported("unbalanced parentheses")
            self.i += 1
            return f"({inner})", empty
        if c == "[":
            return self.set_rule(self.char_class()), False
        if c == ".":
            return self.set_rule(_complement(_NEWLINES)), False
        if c == "\\":
            return self.set_rule(self.escape(in_class=False)), False
        if c in "*+?^$)" or (c == "{" and self.quantifier_at(self.i - 1)):
            raise _Unsupported(f"{c!r} at offset {self.i - 1}")
        return _gbnf_literal(_json_char(ord(c))), False

    def escape(self, in_class: bool) -> _Ranges:
        c = self.peek()
        self.i += 1
        if c.lower() in _CLASS_ESCAPES and c:
            ranges = _normalize(_CLASS_ESCAPES[c.lower()])
            return _complement(ranges) if c.isupper() else ranges
        if c in _CHAR_ESCAPES and c and not (c == "0" and self.peek().isdigit()):
            return ((_CHAR_ESCAPES[c],) * 2,)
        if c == "b" and in_class:  # backspace inside a class, a word boundary outside
            return ((0x08, 0x08),)
        if c and c in "xu":
            digits = 2 if c == "x" else 4
            text = self.p[self.i : self.i + digits]
            if len(text) == digits and all(d in "0123456789abcdefABCDEF" for d in text):
                self.i += digits
                return ((int(text, 16),) * 2,)
        if not c or (c.isascii() and c.isalnum()):  # \b \B boundaries, \1 back references, \p{...}, ...
            raise _Unsupported(f"\\{c}")
        return ((ord(c),) * 2,)  # an escaped punctuation character stands for itself

    def char_class(self) -> _Ranges:
        negated = self.peek() == "^"
        self.i += negated
        if self.peek() == "]":
            raise _Unsupported("an empty character class")
        ranges: list[tuple[int, int]] = []
        while self.peek() != "]":
            if self.peek() == "":
                raise _Unsupported("unbalanced square brackets")
            lo = self.class_atom()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                hi = self.class_atom()
                if len(lo) != 1 or len(hi) != 1 or lo[0][0] != lo[0][1] or hi[0][0] != hi[0][1]:
                    raise _Unsupported("a range with a class escape at one end")
                if lo[0][0] > hi[0][0]:
                    raise _Unsupported("a range out of order")
                ranges.append((lo[0][0], hi[0][0]))
            else:
                ranges.extend(lo)
        self.i += 1
        out = _normalize(ranges)
        return _complement(out) if negated else out

    def class_atom(self) -> _Ranges:
        c = self.peek()
        self.i += 1
        return self.escape(in_class=True) if c == "\\" else ((ord(c), ord(c)),)

    def quantifier_at(self, at: int) -> re.Match[str] | None:
        return _QUANTIFIER.match(self.p, at)

    def quantified(self, atom: str, empty: bool) -> tuple[str, bool]:
        c = self.peek()
        m = self.quantifier_at(self.i) if c == "{" else None
        if c in ("*", "+", "?") and c:
            self.i += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif m is not None:
            self.i = m.end()
            lo = int(m.group(1))
            hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
            if hi is not None and hi < lo:
                raise _Unsupported("a {n,m} with m < n")
            self.repeats += max(lo, hi or 0)
            if self.repeats > MAX_PATTERN_REPEAT:
                raise _Unsupported(f"repeat counts adding up to more than {MAX_PATTERN_REPEAT}")
        else:
            return atom, empty
        if self.peek() == "?":  # lazy: the same strings match
            self.i += 1
        if (self.peek() and self.peek() in "*+?") or self.quantifier_at(self.i):
            raise _Unsupported("a quantifier after a quantifier")
        if empty and hi is None:  # llama.cpp refuses the left recursion `(a*)*` becomes
            raise _Unsupported("an unbounded repeat of a part that can be empty")
        ops = {(0, None): "*", (1, None): "+", (0, 1): "?"}
        op = ops.get((lo, hi)) or (f"{{{lo}}}" if hi == lo else f"{{{lo},{'' if hi is None else hi}}}")
        return atom + op, empty or lo == 0


_QUANTIFIER = re.compile(r"\{(\d+)(,(\d*))?\}")


def pattern_gbnf(pattern: str, any_char: str, add_rule: Callable[[str], str]) -> str:
    """GBNF for the JSON text between the quotes of a string that `pattern` matches (search semantics: an
    unanchored side may carry any text, as rule `any_char`); _Unsupported when GBNF cannot say it."""
    return _PatternParser(pattern, any_char, add_rule).parse()


def _pattern_enforced(pattern: Any) -> bool:
    if not isinstance(pattern, str):
        return False
    try:
        pattern_gbnf(pattern, "char", lambda body: "set")
    except _Unsupported:
        return False
    return True


_ESCAPE_IN_JSON = re.compile(
    r"\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})|\\u([0-9a-f]{4})|\\.", re.IGNORECASE
)


def _raw_non_ascii(json_text: str) -> str:
    """json.dumps text with its \\uXXXX escapes of non-ASCII characters written raw (still the same JSON)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return chr(0x10000 + ((int(m.group(1), 16) - 0xD800) << 10) + int(m.group(2), 16) - 0xDC00)
        cp = int(m.group(3), 16) if m.group(3) else 0
        return chr(cp) if cp >= 0x80 and not 0xD800 <= cp <= 0xDFFF else m.group(0)

    return _ESCAPE_IN_JSON.sub(sub, json_text)


@functools.cache
def _converter_class() -> type:
    from llama_cpp.llama_grammar import PRIMITIVE_RULES, RESERVED_NAMES, BuiltinRule, SchemaConverter

    class Converter(SchemaConverter):  # type: ignore[misc]
        """llama-cpp-python's converter with our fixes: see the comment on each method."""

        def __init__(self) -> None:
            super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
            self._ref_rules: dict[str, str] = {}
            self._depth = 0

        def resolve_refs(self, schema: dict[str, Any], url: str) -> dict[str, Any]:
            # Upstream skips the siblings of a $ref, so "$defs" beside a root "$ref" went unresolved
            # ("does not compile"). Every local ref is registered here, unchanged (_check_schema vetted it).
            stack: list[Any] = [schema]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    ref = node.get("$ref")
                    if isinstance(ref, str) and ref not in self._refs:
                        target: Any = schema
                        for key in _ref_path(schema, ref):
                            target = target[key]
                        self._refs[ref] = target
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)
            return schema

        def _resolve_ref(self, ref: str) -> str:
            # One rule per ref, keyed by the whole ref: upstream keyed by the last path part and found it
            # only when the rule kept that exact name (not "a_b" -> "a-b"), so a $defs DAG was visited
            # once per path (exponential), and two defs sharing a last part shared a rule.
            if ref not in self._ref_rules:
                name = ref.split("/")[-1]
                self._ref_rules[ref] = str(self.visit(self._refs[ref], name or "ref"))
            return self._ref_rules[ref]

        def _format_literal(self, literal: str) -> str:
            # Called with JSON text (a property name or const/enum value); it must match that text exactly.
            # Upstream left backslashes unescaped, so \\b, \\f or \\u0001 in a name broke the grammar or
            # admitted raw control characters.
            return _gbnf_literal(_raw_non_ascii(literal))

        def _add_primitive(self, name: str, rule: Any) -> str:
            # Upstream's string character lets raw control characters through (invalid JSON).
            return str(super()._add_primitive(name, BuiltinRule(_JSON_CHAR, []) if name == "char" else rule))

        def _visit_pattern(self, pattern: str, name: str) -> str:
            char = self._add_primitive("char", PRIMITIVE_RULES["char"])
            sets: dict[str, str] = {}

            def add_set(body: str) -> str:
                if body not in sets:
                    sets[body] = self._add_rule(f"{name}-char{len(sets)}", body)
                return sets[body]

            return str(self._add_rule(name, f'"\\"" {pattern_gbnf(pattern, char, add_set)} "\\"" space'))

        def visit(self, schema: Any, name: str) -> str:
            if not isinstance(schema, dict):
                raise GrammarError("JSON schema: every subschema must be an object")
            if not name and self._depth:  # a property named "": its rule must not become "root"
                name = "empty-name"
            if "pattern" in schema and not _pattern_enforced(schema["pattern"]):
                # Compiled without it (unenforced_keywords names it); a string, as upstream's pattern branch.
                schema = {k: v for k, v in schema.items() if k != "pattern"}
                schema.setdefault("type", "string")
            self._depth += 1
            try:
                if schema.get("type") == "integer" and any(key in schema for key in _INT_BOUNDS):
                    rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
                    return str(self._add_rule(rule_name, int_range_rule(*_int_bounds(schema)) + " space"))
                return str(super().visit(schema, name))
            finally:
                self._depth -= 1

    return Converter


def _convert(schema_text: str) -> str:
    """JSON schema text -> GBNF, in this process (grammar_from_json_schema runs it in a worker)."""
    converter = _converter_class()()
    schema = json.loads(schema_text)
    converter.visit(converter.resolve_refs(schema, ""), "")
    return str(converter.format_grammar())


# Compiles run in worker processes: a time limit kills a stuck one instead of leaving a thread spinning.
MAX_COMPILE_WORKERS = 2
_COMPILER = ProcessPool(MAX_COMPILE_WORKERS, preload=("qwenkit.engines.grammar", "llama_cpp.llama_grammar"))
_CONVERT = ("qwenkit.engines.grammar", "_convert")  # (module, function) the worker runs


def grammar_from_json_schema(schema: Any, after_think: bool = True) -> Grammar:
    """The Grammar for a JSON schema, or GrammarError with a one-line reason (see the module docstring).
    Blocking (up to CONVERT_TIMEOUT_S of compile, plus a wait for a free worker): call it off the event loop.
    """
    if not isinstance(schema, Mapping):
        raise GrammarError("JSON schema must be an object")
    text = json.dumps(schema, ensure_ascii=False)
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SCHEMA_BYTES:
        raise GrammarError(f"JSON schema is larger than {MAX_SCHEMA_BYTES // 1024} KiB")
    _check_schema(schema)
    try:
        gbnf = _COMPILER.call(*_CONVERT, [text], timeout_s=CONVERT_TIMEOUT_S)
    except WorkerTimeout:
        raise GrammarError(f"JSON schema took over {CONVERT_TIMEOUT_S:g} s to compile; simplify it") from None
    except WorkerError as exc:  # the converter raises assorted errors for schemas it cannot handle
        if exc.kind == "GrammarError":
            raise GrammarError(str(exc)) from None
        raise GrammarError(f"JSON schema does not compile: {(str(exc) or exc.kind)[:200]}") from None
    except WorkerCrashed as exc:
        raise GrammarError(f"JSON schema does not compile: the compiler failed ({exc})") from None
    return Grammar(gbnf=str(gbnf), after_think=after_think, json_schema=text)


def json_object_grammar(after_think: bool = True) -> Grammar:
    """Any JSON object."""
    return grammar_from_json_schema({"type": "object"}, after_think)
