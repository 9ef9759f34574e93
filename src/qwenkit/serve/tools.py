"""tool_choice and response_format → what to render and which grammar constrains the answer.

Contract: plan_tools() turns OpenAI tools + tool_choice into a ToolPlan: "none" renders no tools and
parses no calls; "auto" renders them and parses calls; "required" and a named function also constrain the
answer (after </think>) with a GBNF grammar that forces
`<tool_call>\\n{"name": <a declared name>, "arguments": <object valid for its parameters>}\\n</tool_call>`.
The grammar is built by grammar.py's converter (size/depth/recursion limits, compiled in a worker process
that a time limit kills) from an anyOf of {name: const, arguments: $ref to the tool's hoisted parameters};
the <tool_call> markers are matched as the real added tokens (GBNF token syntax). Every tool's parameters
schema is compiled (once; GrammarCache keeps recent results, failures too, per app, and is thread-safe) in
every mode, so a schema the server could not enforce is refused up front with a 400 naming the tool.
plan_tools blocks while it compiles: call it off the event loop.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

from qwenkit.chat.messages import Tool
from qwenkit.engines.grammar import grammar_from_json_schema
from qwenkit.engines.request import Grammar, GrammarError

ToolMode = Literal["none", "auto", "required", "named"]
_DEFS = "$defs"
_HOISTED = "qk_tool_{}"


class GrammarCache:
    """Recently built grammars (or the GrammarError they raised), keyed by a digest of their source.

    Thread-safe: the lock guards the table only, never a build, so other keys are served while a grammar
    compiles; callers asking for a key that is being built wait for that one build instead of repeating it.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[str, Grammar | GrammarError] = OrderedDict()
        self._building: dict[str, Future[Grammar | GrammarError]] = {}

    def get(self, key_source: str, build: Callable[[], Grammar]) -> Grammar:
        key = hashlib.sha256(key_source.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            pending = self._building.get(key) if found is None else None
            owner = found is None and pending is None
            if owner:
                pending = self._building[key] = Future()
        if owner:
            assert pending is not None
            try:
                found = build()
            except GrammarError as exc:
                found = exc
            except BaseException as exc:  # not a schema problem: not cached, the waiters see it too
                with self._lock:
                    del self._building[key]
                pending.set_exception(exc)
                raise
            with self._lock:
                del self._building[key]
                self._items[key] = found
                while len(self._items) > self._size:
                    self._items.popitem(last=False)
            pending.set_result(found)
        elif found is None:
            assert pending is not None
            found = pending.result()
        if isinstance(found, GrammarError):
            raise GrammarError(str(found))
        return found

    def json_schema(self, schema: Mapping[str, Any]) -> Grammar:
        text = json.dumps(schema, ensure_ascii=False)  # key order matters: it orders the JSON produced
        return self.get("schema:" + text, lambda: grammar_from_json_schema(schema, after_think=True))


@dataclass(frozen=True)
class ToolPlan:
    mode: ToolMode
    render: list[Tool]  # the tools the prompt shows
    names: frozenset[str]  # the names a returned call may have
    grammar: Grammar | None


def _rebase_refs(node: Any, base: str) -> Any:
    """A copy of a schema whose local $refs ("#/...") point at it after it moves to `base`."""
    if isinstance(node, Mapping):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
                out[key] = base + value[1:]
            else:
                out[key] = _rebase_refs(value, base)
        return out
    if isinstance(node, list):
        return [_rebase_refs(v, base) for v in node]
    return node


def tool_calls_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """JSON schema of one Hermes tool call: {"name": one of the tools, "arguments": its parameters}."""
    defs: dict[str, Any] = {}
    options = []
    for i, tool in enumerate(tools):
        hoisted = _HOISTED.format(i)
        params = tool.parameters if tool.parameters else {"type": "object"}
        defs[hoisted] = _rebase_refs(params, f"#/{_DEFS}/{hoisted}")
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": {"$ref": f"#/{_DEFS}/{hoisted}"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return {_DEFS: defs, "anyOf": options}


def _fresh_rule(gbnf: str, stem: str) -> str:
    name, i = stem, 0
    while re.search(rf"^{re.escape(name)} ::=", gbnf, re.MULTILINE):
        i += 1
        name = f"{stem}{i}"
    return name


def tool_call_grammar(tools: Sequence[Tool], parallel: bool = True) -> Grammar:
    """The grammar forcing one (or, with parallel, several) well-formed calls to the given tools."""
    base = grammar_from_json_schema(tool_calls_schema(tools), after_think=True)
    call = _fresh_rule(base.gbnf, "qk-call")
    calls = _fresh_rule(base.gbnf, "qk-calls")
    repeat = f' ("\\n" {call})*' if parallel else ""
    # <tool_call> and </tool_call> in angle brackets are token references: the added tokens, not their text.
    rules = (
        f'{call} ::= <tool_call> "\\n" {base.root} "\\n" </tool_call>\n'
        f'{calls} ::= "\\n"? "\\n"? {call}{repeat}\n'
    )
    return Grammar(gbnf=base.gbnf.rstrip("\n") + "\n" + rules, root=calls, after_think=True)


class ToolChoiceError(ValueError):
    """A tool_choice that does not fit the tools given; the message names the fix."""


def plan_tools(
    tools: Sequence[Tool],
    tool_choice: str | None,
    named: str | None,
    parallel: bool,
    cache: GrammarCache,
) -> ToolPlan:
    """The ToolPlan for a request: ToolChoiceError or GrammarError (both → 400) when it cannot be served.
    Tool names must be unique (the caller checks).

    tool_choice is "none" / "auto" / "required" / None (auto), or "named" with `named` giving the function.
    """
    names = frozenset(t.name for t in tools)
    mode: ToolMode = "auto" if tool_choice is None else tool_choice  # type: ignore[assignment]
    if mode in ("required", "named") and not tools:
        raise ToolChoiceError("tool_choice needs tools: give the functions in 'tools'")
    if mode == "named" and named not in names:
        raise ToolChoiceError(f"function {named!r} is not among the tools given")
    for i, tool in enumerate(tools):
        # Each schema is checked (size, depth, recursion, compiles), so any accepted tool can be forced.
        try:
            cache.json_schema(tool.parameters or {"type": "object"})
        except GrammarError as exc:
            raise GrammarError(f"tools[{i}] ({tool.name}): {exc}") from None
    if mode == "none" or not tools:
        return ToolPlan("none", [], frozenset(), None)
    if mode == "auto":
        return ToolPlan("auto", list(tools), names, None)
    if mode == "required":
        source = json.dumps([t.root for t in tools], ensure_ascii=False)
        grammar = cache.get(f"tools:{parallel}:" + source, lambda: tool_call_grammar(tools, parallel))
        return ToolPlan("required", list(tools), names, grammar)
    chosen = next(t for t in tools if t.name == named)
    single = json.dumps(chosen.root, ensure_ascii=False)
    grammar = cache.get("named:" + single, lambda: tool_call_grammar([chosen], parallel=False))
    return ToolPlan("named", list(tools), frozenset({chosen.name}), grammar)
