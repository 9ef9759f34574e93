"""qwenkit.chat.parse: a table of generations, each checked whole, char by char and in random chunks."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from qwenkit.chat.parse import (
    OutputParser,
    OutputParserError,
    ParseDelta,
    ParsedOutput,
    ParsedToolCall,
    ToolCallDelta,
    accumulate,
    parse_output,
)

WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "celsius": {"type": "boolean"},
                    "ratio": {"type": "number"},
                    "tags": {"type": "array"},
                    "opts": {"type": "object"},
                    "zip": {"type": "string"},
                    "limit": {"type": ["integer", "null"]},
                },
            },
        },
    },
    {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
]


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def call(i: int, name: str, arguments: dict[str, Any] | str) -> ParsedToolCall:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ParsedToolCall(f"call_{i}", name, args)


@dataclass
class Case:
    id: str
    text: str
    reasoning: str | None = None
    content: str | None = None
    calls: list[ParsedToolCall] = field(default_factory=list)
    truncated: bool = False
    thinking: bool = True
    think_opened: bool = False
    tools: list[dict[str, Any]] | None = None
    call_names: list[str] | None = None
    partial: bool = False  # a call cut off mid-arguments: its arguments are not a whole JSON object

    def expected(self) -> ParsedOutput:
        return ParsedOutput(self.reasoning, self.content, self.calls, self.truncated)


HERMES_W = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
HERMES_S = '<tool_call>\n{"name": "search", "arguments": {"q": "café"}}\n</tool_call>'

CASES = [
    Case(
        "think_then_content",
        "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
        "Let me think.",
        "The answer is 4.",
    ),
    Case("empty_think_block", "<think>\n\n</think>\n\nHello!", None, "Hello!"),
    Case("empty_think_block_no_newlines", "<think></think>Hello!", None, "Hello!"),
    Case(
        "empty_think_block_then_call",
        "<think>\n\n</think>\n\n" + HERMES_S,
        None,
        None,
        [call(0, "search", {"q": "café"})],
    ),
    Case("leading_ws_before_think", "\n  <think>\nr\n</think>\nc", "r", "c"),
    Case("multiline_reasoning", "<think>\n\na\n\nb\n\n</think>\n\n\nc\n", "a\n\nb", "c\n"),
    Case("truncated_reasoning", "<think>\nStep 1.\nStep 2.\n", "Step 1.\nStep 2.", None, truncated=True),
    Case("truncated_at_partial_end_tag", "<think>\nhmm\n</thi", "hmm\n</thi", None, truncated=True),
    Case("only_think_tag", "<think>", None, None, truncated=True),
    Case("thinking_skipped", "Just an answer.", None, "Just an answer."),
    Case("thinking_skipped_partial_tag", "<thinking is hard>", None, "<thinking is hard>"),
    Case(
        "think_opened",
        "I should add.\n</think>\n\n2 + 2 = 4",
        "I should add.",
        "2 + 2 = 4",
        think_opened=True,
    ),
    Case("think_opened_truncated", "still going", "still going", None, truncated=True, think_opened=True),
    Case("think_opened_empty_output", "", None, None, truncated=True, think_opened=True),
    Case("think_opened_repeated_tag", "<think>\nr\n</think>\n\nc", "r", "c", think_opened=True),
    # thinking=False is for flavours without think tags (Qwen2.5): a thinking flavour always splits the
    # block off, whatever the mode (tests/test_chat_pipeline.py, tests/test_serve_chat.py).
    Case(
        "flavour_without_think_tags_keeps_them",
        "<think>\nx\n</think>\n\ny",
        None,
        "<think>\nx\n</think>\n\ny",
        thinking=False,
    ),
    Case("empty_output", "", None, None),
    Case("hermes_only", HERMES_W, None, None, [call(0, "get_weather", {"city": "Paris"})]),
    Case(
        "hermes_after_think",
        "<think>\nNeed weather.\n</think>\n\n" + HERMES_W,
        "Need weather.",
        None,
        [call(0, "get_weather", {"city": "Paris"})],
    ),
    Case(
        "hermes_text_before",
        "Let me check.\n\n" + HERMES_W,
        None,
        "Let me check.",
        [call(0, "get_weather", {"city": "Paris"})],
        thinking=False,
    ),
    Case(
        "hermes_several_with_text_around",
        "A\n\n" + HERMES_W + "\n" + HERMES_S + "\nthen B\n" + HERMES_W + "\n\nC.",
        None,
        "A\n\nthen B\n\nC.",
        [
            call(0, "get_weather", {"city": "Paris"}),
            call(1, "search", {"q": "café"}),
            call(2, "get_weather", {"city": "Paris"}),
        ],
        thinking=False,
    ),
    Case(
        "hermes_text_only_after",
        HERMES_S + "\n\nDone.",
        None,
        "Done.",
        [call(0, "search", {"q": "café"})],
    ),
    Case(
        "hermes_arguments_as_json_string",
        '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>',
        None,
        None,
        [call(0, "f", '{"a": 1}')],
    ),
    Case(
        "hermes_no_arguments",
        '<tool_call>\n{"name": "now"}\n</tool_call>',
        None,
        None,
        [call(0, "now", {})],
    ),
    Case(
        "hermes_nested_braces_and_end_tag_in_string",
        '<tool_call>\n{"name": "w", "arguments": {"s": "a}b{</tool_call>\\"x", "o": {"p": [1, {"q": []}]}}}\n'
        "</tool_call>",
        None,
        None,
        [call(0, "w", {"s": 'a}b{</tool_call>"x', "o": {"p": [1, {"q": []}]}})],
    ),
    Case(
        "hermes_non_ascii",
        '说明。\n<tool_call>\n{"name": "search", "arguments": {"q": "東京 ☀"}}\n</tool_call>',
        None,
        "说明。",
        [call(0, "search", {"q": "東京 ☀"})],
    ),
    Case(
        "hermes_unknown_name_with_tools",
        '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
        None,
        None,
        [call(0, "nope", {})],
        tools=WEATHER_TOOLS,
    ),
    Case(
        "malformed_json",
        "Try:\n<tool_call>\n{'name': 'f'}\n</tool_call>\nok",
        None,
        "Try:\n<tool_call>\n{'name': 'f'}\n</tool_call>\nok",
    ),
    Case(
        "started_call_missing_outer_brace_stands",
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>\n' + HERMES_S,
        None,
        None,
        [call(0, "f", {"a": 1}), call(1, "search", {"q": "café"})],
    ),
    Case(
        "hermes_arguments_kept_as_written",
        '<tool_call>{"name":"f","arguments":{"a":1,"b":[2, {"c":"}"}]}}</tool_call>',
        None,
        None,
        [call(0, "f", '{"a":1,"b":[2, {"c":"}"}]}')],
    ),
    Case(
        "hermes_arguments_before_name_parsed_when_closed",
        '<tool_call>\n{"arguments": {"a":1}, "name": "f"}\n</tool_call>',
        None,
        None,
        [call(0, "f", {"a": 1})],
    ),
    Case(
        "undeclared_name_is_text",
        "Hm.\n" + HERMES_W + "\n" + HERMES_S,
        None,
        "Hm.\n" + HERMES_W,
        [call(0, "search", {"q": "café"})],
        call_names=["search"],
    ),
    Case(
        "no_callable_names_all_text",
        HERMES_S + "<tool_call>\n<function=search>\n</function>\n</tool_call>",
        None,
        HERMES_S + "<tool_call>\n<function=search>\n</function>\n</tool_call>",
        call_names=[],
    ),
    Case(
        "malformed_missing_name",
        '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',
        None,
        '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',
    ),
    Case(
        "malformed_junk_after_object",
        '<tool_call>\n{"name": "f"}}\n</tool_call>',
        None,
        '<tool_call>\n{"name": "f"}}\n</tool_call>',
    ),
    Case(
        "started_call_keeps_arguments_as_written_even_if_invalid",
        '<tool_call>\n{"name": "f", "arguments": {"x": NaN}}\n</tool_call>',
        None,
        None,
        [call(0, "f", '{"x": NaN}')],
        partial=True,
    ),
    Case(
        "malformed_nan_before_arguments",
        '<tool_call>\n{"name": "f", "x": NaN, "arguments": {}}\n</tool_call>',
        None,
        '<tool_call>\n{"name": "f", "x": NaN, "arguments": {}}\n</tool_call>',
    ),
    Case("unknown_format", "<tool_call>\nf(x=1)\n</tool_call>", None, "<tool_call>\nf(x=1)\n</tool_call>"),
    Case(
        "cut_off_call_keeps_what_it_streamed",
        'Sure.\n\n<tool_call>\n{"name": "f", "arguments": {"a": ',
        None,
        "Sure.",
        [call(0, "f", '{"a": ')],
        partial=True,
    ),
    Case(
        "unclosed_call_before_arguments_is_text",
        'Sure.\n\n<tool_call>\n{"name": "f", "argu',
        None,
        'Sure.\n\n<tool_call>\n{"name": "f", "argu',
    ),
    Case(
        "broken_arguments_stop_at_the_break",
        '<tool_call>\n{"name": "f", "arguments": {"a": 1, <b>}}\n</tool_call>ok',
        None,
        "ok",
        [call(0, "f", '{"a": 1, ')],
        partial=True,
    ),
    Case(
        "cut_off_xml_call_closes_its_object",
        "<tool_call>\n<function=get_weather>\n<parameter=days>\n2\n</parameter>\n<parameter=city>\nPa",
        None,
        None,
        [call(0, "get_weather", {"days": 2})],
        tools=WEATHER_TOOLS,
    ),
    Case(
        "unterminated_string_then_good_call",
        '<tool_call>\n{"name": "f}\n</tool_call>\n' + HERMES_S,
        None,
        '<tool_call>\n{"name": "f}\n</tool_call>',
        [call(0, "search", {"q": "café"})],
    ),
    Case(
        "call_drafted_in_reasoning",
        "<think>\nI could write " + HERMES_W + " here.\n</think>\n\nNo call needed.",
        "I could write " + HERMES_W + " here.",
        "No call needed.",
    ),
    Case(
        "xml_typed_params",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n<parameter=celsius>\ntrue\n</parameter>\n"
        '<parameter=ratio>\n0.5\n</parameter>\n<parameter=tags>\n["a", 1]\n</parameter>\n'
        '<parameter=opts>\n{"x": {"y": null}}\n</parameter>\n<parameter=zip>\n02134\n</parameter>\n'
        "<parameter=limit>\nnull\n</parameter>\n</function>\n</tool_call>",
        None,
        None,
        [
            call(
                0,
                "get_weather",
                {
                    "city": "San Francisco",
                    "days": 3,
                    "celsius": True,
                    "ratio": 0.5,
                    "tags": ["a", 1],
                    "opts": {"x": {"y": None}},
                    "zip": "02134",
                    "limit": None,
                },
            )
        ],
        tools=WEATHER_TOOLS,
    ),
    Case(
        "xml_bad_typed_value_stays_string",
        "<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n"
        "<parameter=tags>\n[1,\n</parameter>\n</function>\n</tool_call>",
        None,
        None,
        [call(0, "get_weather", {"days": "three", "tags": "[1,"})],
        tools=WEATHER_TOOLS,
    ),
    Case(
        "xml_no_schema_keeps_strings",
        "Running it.\n<tool_call>\n<function=run>\n<parameter=code>\nif a < b:\n    x = 1\n\n</parameter>\n"
        "<parameter=n>\n5\n</parameter>\n</function>\n</tool_call>",
        None,
        "Running it.",
        [call(0, "run", {"code": "if a < b:\n    x = 1\n", "n": "5"})],
    ),
    Case(
        "xml_end_tag_inside_parameter",
        "<tool_call>\n<function=echo>\n<parameter=s>\nsay </tool_call> now\n</parameter>\n</function>\n"
        "</tool_call>",
        None,
        None,
        [call(0, "echo", {"s": "say </tool_call> now"})],
    ),
    Case(
        "xml_two_calls_after_think",
        "<think>\nplan\n</think>\n\n<tool_call>\n<function=search>\n<parameter=q>\nx\n</parameter>\n"
        "</function>\n</tool_call>\n<tool_call>\n<function=search>\n<parameter=q>\ny\n</parameter>\n"
        "</function>\n</tool_call>",
        "plan",
        None,
        [call(0, "search", {"q": "x"}), call(1, "search", {"q": "y"})],
        tools=WEATHER_TOOLS,
    ),
    Case(
        "xml_stray_text_between_params_is_skipped",
        "<tool_call>\n<function=f>\nstray\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>",
        None,
        None,
        [call(0, "f", {"a": "1"})],
    ),
    Case(
        "xml_no_parameters",
        "<tool_call>\n<function=now>\n</function>\n</tool_call>",
        None,
        None,
        [call(0, "now", {})],
    ),
    Case(
        "literal_angle_brackets_in_content",
        "if a < b and b <tool or <thin <tool_cal",
        None,
        "if a < b and b <tool or <thin <tool_cal",
        thinking=False,
    ),
    Case("literal_lt_after_think", "<think>\nx < y\n</think>\n\n<b>bold</b> <", "x < y", "<b>bold</b> <"),
    Case("trailing_whitespace_kept_without_call", "Hello  \n", None, "Hello  \n", thinking=False),
    Case("whitespace_only_content", "\n \n", None, "\n \n", thinking=False),
]


def feed_chunks(case: Case, chunks: list[str]) -> tuple[ParsedOutput, list[ParseDelta]]:
    parser = OutputParser(
        thinking=case.thinking,
        think_opened=case.think_opened,
        tools=case.tools,
        id_factory=ids(),
        call_names=case.call_names,
    )
    deltas = [parser.feed(c) for c in chunks]
    deltas.append(parser.finish())
    return accumulate(deltas), deltas


def random_chunks(text: str, rng: random.Random) -> list[str]:
    chunks, i = [], 0
    while i < len(text):
        n = rng.choice([1, 1, 2, 3, 4, 5, 7, 11, 16])
        chunks.append(text[i : i + n])
        i += n
    return chunks


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case_non_streaming(case: Case) -> None:
    got = parse_output(
        case.text,
        thinking=case.thinking,
        think_opened=case.think_opened,
        tools=case.tools,
        id_factory=ids(),
        call_names=case.call_names,
    )
    assert got == case.expected()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case_char_by_char(case: Case) -> None:
    got, deltas = feed_chunks(case, list(case.text))
    assert got == case.expected()
    assert all(d.reasoning_truncated is False for d in deltas[:-1])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_case_random_chunkings(case: Case) -> None:
    for seed in range(24):
        chunks = random_chunks(case.text, random.Random(seed))
        assert "".join(chunks) == case.text
        got, _ = feed_chunks(case, chunks)
        assert got == case.expected(), f"seed {seed}: {chunks!r}"


def test_tool_call_arguments_are_json_objects() -> None:
    for case in CASES:
        if case.partial:
            continue
        for tc in case.expected().tool_calls:
            assert isinstance(json.loads(tc.arguments), dict)


def content_stream(text: str, **kwargs: Any) -> list[ParseDelta]:
    parser = OutputParser(id_factory=ids(), **kwargs)
    deltas = [parser.feed(c) for c in text]
    deltas.append(parser.finish())
    return deltas


@pytest.mark.parametrize(
    ("text", "kwargs", "tags"),
    [
        ("<think>\nr\n</think>\n\nc", {"thinking": True}, ["<think>", "</think>"]),
        ("a</think>b", {"thinking": True, "think_opened": True}, ["</think>"]),
        ("x " + HERMES_W + " y", {"thinking": False}, ["<tool_call>", "</tool_call>"]),
        ("<think>\nr\n</think>\n\n" + HERMES_S, {"thinking": True}, ["<think>", "</think>", "<tool_call>"]),
    ],
)
def test_no_partial_tag_in_any_delta(text: str, kwargs: dict[str, Any], tags: list[str]) -> None:
    deltas = content_stream(text, **kwargs)
    for d in deltas:
        for piece in (d.reasoning, d.content):
            for tag in tags:
                for n in range(2, len(tag) + 1):
                    assert tag[:n] not in piece, f"{tag[:n]!r} leaked in {piece!r}"


def test_partial_think_tag_is_held_then_dropped() -> None:
    parser = OutputParser(thinking=True, id_factory=ids())
    assert parser.feed("<thi") == ParseDelta()
    assert parser.feed("nk>\nabc") == ParseDelta(reasoning="abc")


def test_partial_tag_released_when_not_a_tag() -> None:
    parser = OutputParser(thinking=False, id_factory=ids())
    assert parser.feed("a <tool") == ParseDelta(content="a")
    assert parser.feed("s") == ParseDelta(content=" <tools")


def test_text_is_emitted_as_early_as_possible() -> None:
    parser = OutputParser(thinking=True, id_factory=ids())
    assert parser.feed("<think>\nfirst") == ParseDelta(reasoning="first")
    assert parser.feed(" step\n") == ParseDelta(reasoning=" step")  # trailing newline may be stripped
    assert parser.feed("next\n</think>\n\nHel") == ParseDelta(reasoning="\nnext", content="Hel")
    assert parser.feed("lo wor") == ParseDelta(content="lo wor")
    assert parser.feed("ld.\n\n") == ParseDelta(content="ld.")  # may precede a tool call
    assert parser.feed("More") == ParseDelta(content="\n\nMore")
    assert parser.finish() == ParseDelta()


def test_tool_call_streams_name_then_argument_fragments() -> None:
    parser = OutputParser(thinking=False, id_factory=ids())
    assert parser.feed('Hi\n\n<tool_call>\n{"name": "get_weather", "arg') == ParseDelta(content="Hi")
    assert parser.feed('uments": ') == ParseDelta()
    assert parser.feed('{"ci') == ParseDelta(
        tool_calls=[ToolCallDelta(0, "call_0", "get_weather", ""), ToolCallDelta(0, None, None, '{"ci')]
    )
    assert parser.feed('ty": "Par') == ParseDelta(tool_calls=[ToolCallDelta(0, None, None, 'ty": "Par')])
    assert parser.feed('is"}}\n</tool') == ParseDelta(tool_calls=[ToolCallDelta(0, None, None, 'is"}')])
    assert parser.feed("_call>\nBye") == ParseDelta(content="\n\nBye")
    assert parser.finish() == ParseDelta()


def test_xml_call_streams_one_member_per_closed_parameter() -> None:
    parser = OutputParser(thinking=False, tools=WEATHER_TOOLS, id_factory=ids())
    assert parser.feed("<tool_call>\n<function=get_weather") == ParseDelta()
    assert parser.feed(">\n<parameter=city>\nOslo") == ParseDelta(
        tool_calls=[ToolCallDelta(0, "call_0", "get_weather", "")]
    )
    assert parser.feed("\n</parameter>\n<parameter=days>\n") == ParseDelta(
        tool_calls=[ToolCallDelta(0, None, None, '{"city": "Oslo"')]
    )
    assert parser.feed("3\n</parameter>\n</function>\n</tool_call>") == ParseDelta(
        tool_calls=[ToolCallDelta(0, None, None, ', "days": 3}')]
    )


def test_finish_marks_truncation_only_on_final_delta() -> None:
    parser = OutputParser(thinking=True, id_factory=ids())
    assert parser.feed("<think>\nabc").reasoning_truncated is False
    final = parser.finish()
    assert final.reasoning_truncated is True
    assert parser.reasoning_truncated is True


def test_default_ids_are_unique_call_ids() -> None:
    out = parse_output(HERMES_W + HERMES_S, thinking=False)
    assert [c.id[:5] for c in out.tool_calls] == ["call_", "call_"]
    assert out.tool_calls[0].id != out.tool_calls[1].id


def test_accumulate_merges_argument_fragments() -> None:
    deltas = [
        ParseDelta(content="x", tool_calls=[ToolCallDelta(0, "id0", "f", '{"a"')]),
        ParseDelta(tool_calls=[ToolCallDelta(0, None, None, ": 1}"), ToolCallDelta(1, "id1", "g", "{}")]),
    ]
    assert accumulate(deltas) == ParsedOutput(
        None, "x", [ParsedToolCall("id0", "f", '{"a": 1}'), ParsedToolCall("id1", "g", "{}")], False
    )


def test_accumulate_rejects_fragment_without_start() -> None:
    with pytest.raises(OutputParserError, match="without an id and name"):
        accumulate([ParseDelta(tool_calls=[ToolCallDelta(0, None, None, "{}")])])


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(OutputParserError, match="think_opened=True needs thinking=True"):
        OutputParser(thinking=False, think_opened=True)
    with pytest.raises(OutputParserError, match=r"tools\[0\] has no function name"):
        OutputParser(thinking=False, tools=[{"type": "function", "function": {"parameters": {}}}])
    parser = OutputParser(thinking=False)
    parser.finish()
    with pytest.raises(OutputParserError, match="feed\\(\\) after finish"):
        parser.feed("x")
    with pytest.raises(OutputParserError, match="finish\\(\\) called twice"):
        parser.finish()


def test_broken_json_call_is_released_when_its_end_tag_arrives() -> None:
    # A "<" outside any JSON string means the object is broken: no need to wait for finish().
    raw = '<tool_call>\n{"name": "f", "x": {"a": 1}\n</tool_call>'
    parser = OutputParser(thinking=False, id_factory=ids())
    assert parser.feed(raw[:-1]) == ParseDelta()
    assert parser.feed(raw[-1] + "\nok") == ParseDelta(content=raw + "\nok")
