"""Generated text → OpenAI-style reasoning / content / tool-call deltas, streaming or all at once.

Contract: OutputParser.feed(chunk) returns what is certain so far and finish() flushes the rest; any
chunking of the same text gives the same accumulated ParsedOutput as parse_output(text) (one code path).
Think block: thinking=True means the flavour's models think (Flavor.thinks), whatever the mode in force:
Qwen3 still writes `<think>\n\n</think>\n\n` itself after /no_think. Then output may open with `<think>`
(after whitespace), which is always split off, or, with think_opened, start inside the block; reasoning is
`.strip("\n")`-ed (an empty block leaves none), content after `</think>` is `.lstrip("\n")`-ed, and a
missing `</think>` makes everything reasoning with reasoning_truncated set. thinking=False (a flavour
without think tags, or a continued message) keeps any tag as plain content.
Tool calls (Hermes JSON or Qwen3-Coder XML inside `<tool_call>`) are parsed in content only, never in
reasoning. Content whitespace: whitespace touching a tool call is dropped, and content that follows a call
is joined to earlier content with "\n\n".
Tool calls stream: a call starts (id + name, empty arguments) as soon as its name and the opening of its
arguments are known — Hermes `{"name": "...", "arguments": {` or XML `<function=...>` — and its arguments
follow in fragments: Hermes as the model wrote them, XML as one JSON member per closed <parameter>. From
then on it stands: a broken or cut-off rest keeps the fragments already sent. A call that never reaches
that point (other key order, string arguments, no arguments) is parsed when it closes and emitted whole, or
returned verbatim as content if malformed or unclosed. call_names, when given, limits which names become
calls; any other call is returned verbatim as content. Model output is only read with json.loads and plain
string scanning.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from qwenkit.tokenizer.specials import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START

_WS = " \t\r\n"
_FUNCTION_OPEN = "<function="
_PARAMETER_OPEN = "<parameter="
_PARAMETER_CLOSE = "</parameter>"
_XML_CALL_RE = re.compile(r"[ \t\r\n]*<function=([^>\n]+)>(.*?)(?:</function>)?[ \t\r\n]*", re.DOTALL)
_XML_PARAM_RE = re.compile(r"[ \t\r\n]*<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)
_INTEGER_RE = re.compile(r"[+-]?\d+")
# The start of a Hermes call whose arguments object can stream: the name (a complete JSON string) comes first.
_HERMES_HEAD_RE = re.compile(
    r'[ \t\r\n]*\{[ \t\r\n]*"name"[ \t\r\n]*:[ \t\r\n]*("(?:[^"\\\n]|\\.)*")[ \t\r\n]*,'
    r'[ \t\r\n]*"arguments"[ \t\r\n]*:[ \t\r\n]*(?=\{)'
)
_XML_HEAD_RE = re.compile(r"[ \t\r\n]*<function=([^>\n]+)>")


class OutputParserError(ValueError):
    """Bad arguments given to the parser (never raised for model output, which cannot be 'bad')."""


@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed tool-call fragment; maps 1:1 onto an OpenAI `delta.tool_calls` entry.

    A call's first fragment carries its id and name; later ones only a piece of the arguments text.
    """

    index: int
    id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class ParseDelta:
    """What one feed()/finish() call adds; reasoning_truncated is only ever set on finish()'s delta."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    reasoning_truncated: bool = False

    @property
    def empty(self) -> bool:
        return not (self.reasoning or self.content or self.tool_calls or self.reasoning_truncated)

    def then(self, later: ParseDelta) -> ParseDelta:
        """This delta followed by a later one (e.g. the last feed() and finish()) as one delta."""
        return ParseDelta(
            reasoning=self.reasoning + later.reasoning,
            content=self.content + later.content,
            tool_calls=[*self.tool_calls, *later.tool_calls],
            reasoning_truncated=later.reasoning_truncated,
        )


@dataclass(frozen=True)
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class ParsedOutput:
    """A whole parsed generation; empty reasoning/content are None."""

    reasoning: str | None
    content: str | None
    tool_calls: list[ParsedToolCall]
    reasoning_truncated: bool


def new_tool_call_id() -> str:
    """The default tool-call id: "call_" + a random uuid4 hex."""
    return "call_" + uuid.uuid4().hex


class ParseAccumulator:
    """Adds ParseDeltas up into a ParsedOutput (tool-call fragments are merged by index)."""

    def __init__(self) -> None:
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
        self._truncated = False

    def add(self, delta: ParseDelta) -> None:
        self._reasoning.append(delta.reasoning)
        self._content.append(delta.content)
        self._truncated = self._truncated or delta.reasoning_truncated
        for tc in delta.tool_calls:
            call = self._calls.get(tc.index)
            if call is None:
                if not tc.id or not tc.name:
                    raise OutputParserError(
                        f"tool call {tc.index} starts without an id and name; feed every delta in order"
                    )
                self._calls[tc.index] = [tc.id, tc.name, tc.arguments]
            else:
                call[2] += tc.arguments

    def result(self) -> ParsedOutput:
        reasoning = "".join(self._reasoning)
        content = "".join(self._content)
        return ParsedOutput(
            reasoning=reasoning or None,
            content=content or None,
            tool_calls=[ParsedToolCall(*self._calls[i]) for i in sorted(self._calls)],
            reasoning_truncated=self._truncated,
        )


def accumulate(deltas: Iterable[ParseDelta]) -> ParsedOutput:
    """The ParsedOutput that a sequence of deltas (ending with finish()'s) adds up to."""
    acc = ParseAccumulator()
    for delta in deltas:
        acc.add(delta)
    return acc.result()


def parse_output(
    text: str,
    *,
    thinking: bool,
    think_opened: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    id_factory: Callable[[], str] = new_tool_call_id,
    call_names: Collection[str] | None = None,
) -> ParsedOutput:
    """Parse a whole generation at once (the streaming parser fed once, then finished)."""
    parser = OutputParser(
        thinking=thinking,
        think_opened=think_opened,
        tools=tools,
        id_factory=id_factory,
        call_names=call_names,
    )
    return accumulate([parser.feed(text), parser.finish()])


class _State(Enum):
    START = auto()  # before a possible leading <think>
    REASONING = auto()
    POST_THINK = auto()  # dropping newlines after </think>
    CONTENT = auto()
    CALL = auto()  # inside <tool_call>: streaming a started call, or buffering one until it closes
    DONE = auto()


class OutputParser:
    """Incremental parser for one generation: feed() text chunks of any size, then finish() once.

    thinking: split off a leading think block (the flavour thinks, whatever the mode in force);
    think_opened: the prompt opened the block, so output starts inside it.
    """

    def __init__(
        self,
        *,
        thinking: bool,
        think_opened: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        id_factory: Callable[[], str] = new_tool_call_id,
        call_names: Collection[str] | None = None,
    ) -> None:
        if think_opened and not thinking:
            raise OutputParserError("think_opened=True needs thinking=True (the prompt opened a think block)")
        self._think_opened = think_opened
        self._schemas = _tool_schemas(tools)
        self._id_factory = id_factory
        self._state = _State.START if thinking else _State.CONTENT
        self._buf = ""  # text received but not yet decided on
        self._reasoning = _ReasoningSink()
        self._content = _ContentSink()
        self._scanner = _CallScanner()
        self._open: _OpenCall | None = None  # the call being streamed
        self._names = None if call_names is None else frozenset(call_names)
        self._n_calls = 0
        self._truncated = False

    @property
    def reasoning_truncated(self) -> bool:
        return self._truncated

    def feed(self, text: str) -> ParseDelta:
        """Take the next chunk of generated text; return what can be emitted for certain."""
        if self._state is _State.DONE:
            raise OutputParserError("feed() after finish(); make a new OutputParser for each generation")
        out = _Out()
        self._buf += text
        self._run(out)
        return out.delta()

    def finish(self) -> ParseDelta:
        """End of generation: flush held-back text; an unclosed think block marks reasoning truncated."""
        if self._state is _State.DONE:
            raise OutputParserError("finish() called twice; make a new OutputParser for each generation")
        out = _Out()
        if self._state is _State.START:
            self._state = _State.REASONING if self._think_opened else _State.CONTENT
            self._run(out)
        if self._state is _State.CALL and self._open is not None:
            # A started call cut off by the end of generation keeps what it streamed; XML closes its object.
            self._stream_call(out, len(self._buf), closed=True)
            self._open = None
            self._buf = ""
            self._state = _State.CONTENT
        while self._state is _State.CALL:
            # Unclosed call: up to the first literal </tool_call> is raw content, then parse on from there.
            end = self._buf.find(TOOL_CALL_END)
            cut = len(self._buf) if end < 0 else end + len(TOOL_CALL_END)
            out.content.append(self._content.add(TOOL_CALL_START + self._buf[:cut]))
            self._buf = self._buf[cut:]
            self._state = _State.CONTENT
            self._run(out)
        if self._state is _State.REASONING:
            out.reasoning.append(self._reasoning.add(self._buf))
            self._truncated = out.truncated = True
        else:
            out.content.append(self._content.add(self._buf))
        out.content.append(self._content.finish())
        self._buf = ""
        self._state = _State.DONE
        return out.delta()

    def _run(self, out: _Out) -> None:
        steps = {
            _State.START: self._step_start,
            _State.REASONING: self._step_reasoning,
            _State.POST_THINK: self._step_post_think,
            _State.CONTENT: self._step_content,
            _State.CALL: self._step_call,
        }
        while steps[self._state](out):
            pass

    # Each step consumes what it can from self._buf; True means "state changed, run again".

    def _step_start(self, out: _Out) -> bool:
        rest = self._buf.lstrip(_WS)
        if rest.startswith(THINK_START):
            self._buf = rest[len(THINK_START) :]
            self._state = _State.REASONING
            return True
        if THINK_START.startswith(rest):
            return False  # only whitespace or a partial <think> so far
        self._state = _State.REASONING if self._think_opened else _State.CONTENT
        return True

    def _step_reasoning(self, out: _Out) -> bool:
        end = self._buf.find(THINK_END)
        if end >= 0:
            out.reasoning.append(self._reasoning.add(self._buf[:end]))
            self._buf = self._buf[end + len(THINK_END) :]
            self._state = _State.POST_THINK
            return True
        keep = len(self._buf) - _partial_tag_len(self._buf, THINK_END)
        out.reasoning.append(self._reasoning.add(self._buf[:keep]))
        self._buf = self._buf[keep:]
        return False

    def _step_post_think(self, out: _Out) -> bool:
        self._buf = self._buf.lstrip("\n")
        if not self._buf:
            return False
        self._state = _State.CONTENT
        return True

    def _step_content(self, out: _Out) -> bool:
        start = self._buf.find(TOOL_CALL_START)
        if start >= 0:
            out.content.append(self._content.add(self._buf[:start]))
            self._buf = self._buf[start + len(TOOL_CALL_START) :]
            self._scanner = _CallScanner()
            self._state = _State.CALL
            return True
        keep = len(self._buf) - _partial_tag_len(self._buf, TOOL_CALL_START)
        out.content.append(self._content.add(self._buf[:keep]))
        self._buf = self._buf[keep:]
        return False

    def _step_call(self, out: _Out) -> bool:
        found = self._scanner.scan(self._buf)
        if self._open is None:
            self._try_start(out, self._buf if found is None else self._buf[: found[0]])
        if self._open is not None:
            self._stream_call(out, len(self._buf) if found is None else found[0], closed=found is not None)
        if found is None:
            return False
        body_end, after = found
        if self._open is not None:
            self._open = None
        else:
            call = _parse_call(self._buf[:body_end], self._scanner.mode, self._schemas)
            if call is None or not self._callable(call[0]):
                out.content.append(self._content.add(TOOL_CALL_START + self._buf[:after]))
            else:
                self._content.call()
                out.tool_calls.append(ToolCallDelta(self._n_calls, self._id_factory(), call[0], call[1]))
                self._n_calls += 1
        self._buf = self._buf[after:]
        self._state = _State.CONTENT
        return True

    def _callable(self, name: str) -> bool:
        return self._names is None or name in self._names

    def _try_start(self, out: _Out, body: str) -> None:
        """Start streaming the call once its name and the opening of its arguments are known."""
        mode = self._scanner.kind
        if mode == "json" and (head := _HERMES_HEAD_RE.match(body)):
            try:
                name = _loads(head.group(1))
            except ValueError:
                return
            start = head.end()
        elif mode == "xml" and (head := _XML_HEAD_RE.match(body)):
            name, start = head.group(1).strip(), head.end()
        else:
            return
        if not name.strip() or not self._callable(name):
            return
        self._content.call()
        self._open = _OpenCall(self._n_calls, name, mode, start)
        out.tool_calls.append(ToolCallDelta(self._n_calls, self._id_factory(), name, ""))
        self._n_calls += 1

    def _stream_call(self, out: _Out, body_end: int, closed: bool) -> None:
        """Emit the started call's arguments that are certain now (all of them once it has closed)."""
        call = self._open
        assert call is not None
        if call.mode == "json":
            end = self._scanner.arguments_end()
            piece = self._buf[call.pos : end]
            call.pos = max(call.pos, end)
        else:
            piece = self._xml_members(call, body_end)
            if closed:
                piece += "}" if call.members else "{}"
        if piece:
            out.tool_calls.append(ToolCallDelta(call.index, None, None, piece))

    def _xml_members(self, call: _OpenCall, body_end: int) -> str:
        """`{"key": value` / `, "key": value` for each <parameter> closed since the last call."""
        pieces: list[str] = []
        properties = self._schemas.get(call.name, {})
        while (opened := self._buf.find(_PARAMETER_OPEN, call.pos, body_end)) >= 0:
            closed = self._buf.find(_PARAMETER_CLOSE, opened, body_end)
            name_end = self._buf.find(">", opened)
            if closed < 0 or name_end < 0 or name_end > closed:
                break
            key = self._buf[opened + len(_PARAMETER_OPEN) : name_end].strip()
            # Qwen3-Coder writes each value between newlines; strip exactly one on each side.
            value = self._buf[name_end + 1 : closed].removeprefix("\n").removesuffix("\n")
            member = json.dumps(key, ensure_ascii=False) + ": "
            member += json.dumps(_convert(value, properties.get(key)), ensure_ascii=False)
            pieces.append(("{" if not call.members else ", ") + member)
            call.members += 1
            call.pos = closed + len(_PARAMETER_CLOSE)
        return "".join(pieces)


@dataclass
class _OpenCall:
    """A call being streamed: its index, format, and how far its body has been turned into fragments."""

    index: int
    name: str
    mode: str  # "json" or "xml"
    pos: int  # json: next argument char to emit; xml: where to look for the next <parameter>
    members: int = 0  # xml: parameters emitted


class _Out:
    """Pieces collected during one feed()/finish()."""

    def __init__(self) -> None:
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.tool_calls: list[ToolCallDelta] = []
        self.truncated = False

    def delta(self) -> ParseDelta:
        return ParseDelta("".join(self.reasoning), "".join(self.content), self.tool_calls, self.truncated)


class _ReasoningSink:
    """Applies .strip("\\n") to the reasoning as it streams: drops leading newlines, holds trailing ones."""

    def __init__(self) -> None:
        self._started = False
        self._pending = ""

    def add(self, text: str) -> str:
        if not self._started:
            text = text.lstrip("\n")
            if not text:
                return ""
            self._started = True
        text = self._pending + text
        core = text.rstrip("\n")
        self._pending = text[len(core) :]
        return core


class _ContentSink:
    """Content whitespace rule: whitespace touching a tool call is dropped; text after a call is joined
    to earlier content with "\\n\\n". Trailing whitespace is held until it is known not to touch a call."""

    def __init__(self) -> None:
        self._pending = ""  # trailing whitespace not yet emitted
        self._after_call = False
        self._emitted = False

    def add(self, text: str) -> str:
        text = self._pending + text
        core = text.strip(_WS)
        if not core:
            self._pending = text
            return ""
        lead = text[: len(text) - len(text.lstrip(_WS))]
        if self._after_call:
            lead = "\n\n" if self._emitted else ""
            self._after_call = False
        self._pending = text[len(text.rstrip(_WS)) :]
        self._emitted = True
        return lead + core

    def call(self) -> None:
        self._pending = ""
        self._after_call = True

    def finish(self) -> str:
        text = "" if self._after_call else self._pending
        self._pending = ""
        return text


class _CallScanner:
    """Finds where a tool call closes, incrementally, given the text after <tool_call> so far.

    mode: "json" (Hermes; a </tool_call> inside a JSON string does not close), "xml" (Qwen3-Coder; nor
    does one inside an open <parameter=...>), "other" (closes at the first </tool_call>).
    """

    def __init__(self) -> None:
        self.mode: str | None = None
        self.kind: str | None = None  # the mode first detected, kept when a broken call turns "other"
        self._pos = 0  # json: next char to scan; xml/other: where to search for </tool_call> next
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._json_end: int | None = None
        self._inner_close: int | None = None  # end of the first object/array nested in the call object
        self._json_stop: int | None = None  # where the JSON broke off

    def arguments_end(self) -> int:
        """How far a started Hermes call's arguments can be emitted: to the end of the arguments object
        once it closed, else to where the JSON broke off, else to the end of what was scanned."""
        if self._inner_close is not None:
            return self._inner_close
        if self._json_stop is not None:
            return self._json_stop
        return self._pos

    def scan(self, body: str) -> tuple[int, int] | None:
        """(end of the call's body, end of its closing tag) once the call has closed, else None."""
        if self.mode is None:
            head = body.lstrip(_WS)
            if not head:
                return None
            if head[0] == "{":
                self.mode, self._pos = "json", len(body) - len(head)
            elif head.startswith(_FUNCTION_OPEN):
                self.mode = "xml"
            elif _FUNCTION_OPEN.startswith(head):
                return None
            else:
                self.mode = "other"
            self.kind = self.mode
        if self.mode == "json":
            return self._scan_json(body)
        return self._scan_tag(body)

    def _scan_json(self, body: str) -> tuple[int, int] | None:
        if self._json_end is None:
            for i in range(self._pos, len(body)):
                ch = body[i]
                if self._in_string:
                    if self._escaped:
                        self._escaped = False
                    elif ch == "\\":
                        self._escaped = True
                    elif ch == '"':
                        self._in_string = False
                elif ch == '"':
                    self._in_string = True
                elif ch in "{[":
                    self._depth += 1
                elif ch in "}]":
                    self._depth -= 1
                    if self._depth == 1 and self._inner_close is None:
                        self._inner_close = i + 1
                    if self._depth == 0:
                        self._json_end = i + 1
                        break
                elif ch == "<":
                    # "<" outside a string is never JSON: the object is broken, close at the next tag.
                    self.mode, self._pos, self._json_stop = "other", i, i
                    return self._scan_tag(body)
            else:
                self._pos = len(body)
                return None
        rest = body[self._json_end :]
        tail = rest.lstrip(_WS)
        if tail.startswith(TOOL_CALL_END):
            return self._json_end, len(body) - len(tail) + len(TOOL_CALL_END)
        if TOOL_CALL_END.startswith(tail):
            return None
        # Junk after the object: malformed.
        self.mode, self._pos, self._json_stop = "other", self._json_end, self._json_end
        return self._scan_tag(body)

    def _scan_tag(self, body: str) -> tuple[int, int] | None:
        while True:
            end = body.find(TOOL_CALL_END, self._pos)
            if end < 0:
                self._pos = max(self._pos, len(body) - len(TOOL_CALL_END) + 1)
                return None
            if self.mode == "xml" and _inside_parameter(body[:end]):
                self._pos = end + 1
                continue
            return end, end + len(TOOL_CALL_END)


def _inside_parameter(text: str) -> bool:
    opened = text.rfind(_PARAMETER_OPEN)
    return opened >= 0 and text.find(_PARAMETER_CLOSE, opened) < 0


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (text to hold back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> Any:
    """json.loads without NaN/Infinity, which json.dumps would write back as invalid JSON."""
    return json.loads(text, parse_constant=_reject_constant)


def _parse_call(
    body: str, mode: str | None, schemas: Mapping[str, Mapping[str, Any]]
) -> tuple[str, str] | None:
    """(name, arguments JSON) for a well-formed call body, None if it is malformed."""
    if mode == "json":
        return _parse_hermes(body)
    if mode == "xml":
        return _parse_xml(body, schemas)
    return None


def _parse_hermes(body: str) -> tuple[str, str] | None:
    try:
        obj = _loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            decoded = _loads(args)
        except (ValueError, RecursionError):
            return None
        return (name, args) if isinstance(decoded, dict) else None
    if not isinstance(args, dict):
        return None
    return name, json.dumps(args, ensure_ascii=False)


def _parse_xml(body: str, schemas: Mapping[str, Mapping[str, Any]]) -> tuple[str, str] | None:
    call = _XML_CALL_RE.fullmatch(body)
    if call is None:
        return None
    name = call.group(1).strip()
    inner = call.group(2)
    if not name:
        return None
    properties = schemas.get(name, {})
    args: dict[str, Any] = {}
    pos = 0
    while (param := _XML_PARAM_RE.match(inner, pos)) is not None:
        key = param.group(1).strip()
        value = param.group(2)
        # Qwen3-Coder writes each value between newlines; strip exactly one on each side.
        value = value.removeprefix("\n").removesuffix("\n")
        args[key] = _convert(value, properties.get(key))
        pos = param.end()
    if inner[pos:].strip(_WS):
        return None
    return name, json.dumps(args, ensure_ascii=False)


def _schema_types(schema: Mapping[str, Any]) -> list[str]:
    declared = schema.get("type")
    if isinstance(declared, str):
        return [declared]
    if isinstance(declared, list):
        return [t for t in declared if isinstance(t, str)]
    types: list[str] = []
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            if isinstance(sub, Mapping):
                types.extend(_schema_types(sub))
    return types


def _convert(raw: str, schema: Any) -> Any:
    """The raw XML parameter text as the schema's type (first type that fits), else the string itself."""
    if not isinstance(schema, Mapping):
        return raw
    text = raw.strip(_WS)
    for kind in _schema_types(schema):
        if kind == "string":
            return raw
        if kind == "integer" and _INTEGER_RE.fullmatch(text):
            return int(text)
        if kind == "boolean" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if kind == "null" and text == "null":
            return None
        if kind in ("number", "object", "array"):
            try:
                value = _loads(text)
            except (ValueError, RecursionError):
                continue
            wanted = {"number": (int, float), "object": dict, "array": list}[kind]
            if isinstance(value, wanted) and not isinstance(value, bool):
                return value
    return raw


def _tool_schemas(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]]:
    """Function name → its parameters' `properties`, from OpenAI tool dicts (or bare function dicts)."""
    schemas: dict[str, Mapping[str, Any]] = {}
    for i, tool in enumerate(tools or ()):
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str) or not name:
            raise OutputParserError(
                f"tools[{i}] has no function name; pass OpenAI tools like "
                "{'type': 'function', 'function': {'name': ..., 'parameters': {...}}}"
            )
        params = fn.get("parameters") or {}
        props = params.get("properties") if isinstance(params, Mapping) else None
        schemas[name] = props if isinstance(props, Mapping) else {}
    return schemas
