"""Scorers: does a model's answer (reasoning already split off) match a case? Each returns 0..1 and a detail.

Contract: SCORERS maps every ScorerName to one small function score(answer, case) -> Score. They read only
the answer's content and tool calls (never its reasoning), parse model output with json/regex/float only
(never eval), and may raise on a malformed case: the runner records that sample as failed with the error.
numeric: the `#### N` line if any, else the last number; commas in 1,234 and fractions (3/4) are read as
decimals. choice: a letter A-J from "Answer: C", "(C)", "C." or a lone "C". tool_calls: names and
JSON arguments equal, order-insensitive. python_tests: code + tests run by sandbox.run_python.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

from qwenkit.evals.sandbox import run_python

if TYPE_CHECKING:
    from qwenkit.evals.tasks import EvalCase

ScorerName = Literal[
    "exact", "normalised", "regex", "numeric", "choice", "json_schema", "tool_calls", "python_tests",
    "numeric_or_exact",
]  # fmt: skip


@dataclass(frozen=True)
class Answer:
    """What a model answered, after its reasoning was split off: the text and any tool calls
    (each {"name": str, "arguments": str of JSON or dict})."""

    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    reasoning: str = ""


@dataclass(frozen=True)
class Score:
    value: float
    detail: str = ""


# ---- numbers ---------------------------------------------------------------------------------------------

# 1,234,567.5 | 12.5 | .5 | 3/4 ; a leading minus or $ is allowed.
_NUMBER = r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:\s*/\s*\d+)?"
_NUMBER_RE = re.compile(r"(?<![\w.])(" + _NUMBER + r")(?![\w])")
_FINAL_RE = re.compile(r"####\s*(" + _NUMBER + ")")


def parse_number(text: str) -> float | None:
    """A number as written (1,234 / -3.5 / $12 / 3/4), or None."""
    t = text.strip().replace("$", "").replace(",", "").replace(" ", "")
    if not t or not any(c.isdigit() for c in t):
        return None
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            return float(Fraction(int(num), int(den)))
        return float(t)
    except (ValueError, ZeroDivisionError):
        return None


def final_number(text: str) -> float | None:
    """GSM8K-style final answer: the number after the last `####`, else the last number in the text."""
    finals = _FINAL_RE.findall(text)
    for candidate in reversed(finals):
        value = parse_number(candidate)
        if value is not None:
            return value
    for candidate in reversed(_NUMBER_RE.findall(text)):
        value = parse_number(candidate)
        if value is not None:
            return value
    return None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def _expected_number(case: EvalCase) -> float:
    value = case.answer if isinstance(case.answer, int | float) else None
    if isinstance(case.answer, str):
        value = final_number(case.answer)
    if value is None or isinstance(value, bool):
        raise ValueError(f"the case's answer {case.answer!r} is not a number")
    return float(value)


def score_numeric(answer: Answer, case: EvalCase) -> Score:
    expected = _expected_number(case)
    got = final_number(answer.content)
    if got is None:
        return Score(0.0, "no number in the answer")
    return Score(1.0 if _close(got, expected) else 0.0, f"got {got:g}, expected {expected:g}")


# ---- text ------------------------------------------------------------------------------------------------

_PUNCT = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    """Lower case, no punctuation, single spaces."""
    return " ".join(text.lower().translate(_PUNCT).split())


def _expected_text(case: EvalCase) -> str:
    if case.answer is None:
        raise ValueError("the case has no answer to compare with")
    return case.answer if isinstance(case.answer, str) else json.dumps(case.answer)


def score_exact(answer: Answer, case: EvalCase) -> Score:
    expected = _expected_text(case)
    return Score(1.0 if answer.content.strip() == expected.strip() else 0.0)


def score_normalised(answer: Answer, case: EvalCase) -> Score:
    expected = _expected_text(case)
    return Score(1.0 if normalise(answer.content) == normalise(expected) else 0.0)


def score_regex(answer: Answer, case: EvalCase) -> Score:
    pattern = re.compile(_expected_text(case))
    found = pattern.search(answer.content)
    return Score(1.0 if found else 0.0, "" if found else f"no match for /{pattern.pattern}/")


def score_numeric_or_exact(answer: Answer, case: EvalCase) -> Score:
    """numeric when the expected answer is a number (42, "1,234", "#### 7"), else exact."""
    expected = case.answer
    is_number = isinstance(expected, int | float) and not isinstance(expected, bool)
    if isinstance(expected, str) and parse_number(expected.split("####")[-1]) is not None:
        is_number = True
    return score_numeric(answer, case) if is_number else score_exact(answer, case)


# ---- multiple choice -------------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"
_CHOICE_PATTERNS = (
    re.compile(r"answer\s*(?:is|:)?\s*[:\-]?\s*\(?\**([A-J])\b\)?", re.IGNORECASE),
    re.compile(r"\(([A-J])\)"),
    re.compile(r"^\s*\**([A-J])[.):]", re.MULTILINE),
    re.compile(r"^\s*\**([A-J])\**\s*$", re.MULTILINE),
)


def choice_letter(text: str) -> str | None:
    """The option letter an answer picks: the last "Answer: X", else "(X)", else "X." / a lone X."""
    for i, pattern in enumerate(_CHOICE_PATTERNS):
        found = pattern.findall(text)
        if found:
            # the "answer is" pattern is case-insensitive for its words, not for the letter
            letters = [f for f in found if f in LETTERS] if i == 0 else found
            if letters:
                return letters[-1].upper()
    return None


def _expected_letter(case: EvalCase) -> str:
    value = case.answer
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(LETTERS):
        return LETTERS[value]
    if isinstance(value, str) and value.strip().upper() in LETTERS and len(value.strip()) == 1:
        return value.strip().upper()
    raise ValueError(f"a multiple-choice answer must be a letter A-J or an index 0-9, got {value!r}")


def score_choice(answer: Answer, case: EvalCase) -> Score:
    expected = _expected_letter(case)
    got = choice_letter(answer.content)
    return Score(1.0 if got == expected else 0.0, f"got {got or 'no letter'}, expected {expected}")


# ---- JSON ------------------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any:
    """The first JSON object or array in text (a ``` fence's body first); ValueError when there is none."""
    candidates = [*_FENCE_RE.findall(text), text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for start, ch in enumerate(candidate):
            if ch in "{[":
                try:
                    return decoder.raw_decode(candidate, start)[0]
                except ValueError:
                    continue
    raise ValueError("no JSON object in the answer")


def score_json_schema(answer: Answer, case: EvalCase) -> Score:
    import jsonschema

    if case.schema_ is None:
        raise ValueError("a json_schema case needs a 'schema'")
    try:
        value = extract_json(answer.content)
    except ValueError as exc:
        return Score(0.0, str(exc))
    validator_cls = jsonschema.validators.validator_for(case.schema_)
    validator_cls.check_schema(case.schema_)  # a broken schema is the case's fault: raises
    error = jsonschema.exceptions.best_match(validator_cls(case.schema_).iter_errors(value))
    if error is not None:
        return Score(0.0, f"schema: {error.message[:200]}")
    if case.answer is not None and value != case.answer:
        return Score(0.0, "valid, but not the expected value")
    return Score(1.0)


# ---- tool calls ------------------------------------------------------------------------------------------


def _canonical_call(call: Mapping[str, Any]) -> str:
    if "function" in call and isinstance(call["function"], Mapping):  # OpenAI shape
        call = call["function"]
    args = call.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return json.dumps([call.get("name"), "<invalid JSON arguments>", args])
    return json.dumps([call.get("name"), args], sort_keys=True)


def score_tool_calls(answer: Answer, case: EvalCase) -> Score:
    expected = case.answer
    if isinstance(expected, Mapping):
        expected = [expected]
    if not isinstance(expected, list) or not all(isinstance(c, Mapping) and "name" in c for c in expected):
        raise ValueError('a tool_calls answer must be a list of {"name": ..., "arguments": {...}}')
    want = sorted(_canonical_call(c) for c in expected)
    got = sorted(_canonical_call(c) for c in answer.tool_calls)
    if got == want:
        return Score(1.0)
    names = [json.loads(g)[0] for g in got]
    return Score(0.0, f"called {names or 'nothing'}; expected {[json.loads(w)[0] for w in want]}")


# ---- code ------------------------------------------------------------------------------------------------

_CODE_FENCE_RE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The Python in an answer: its ``` blocks joined (an unclosed last fence counts), else the whole text."""
    blocks = _CODE_FENCE_RE.findall(text)
    if blocks:
        return "\n\n".join(blocks)
    opened = re.search(r"```(?:python|py|python3)?[ \t]*\n(.*)$", text, re.DOTALL)
    return opened.group(1) if opened else text


def solution_program(answer: Answer, case: EvalCase) -> str:
    """The program the sandbox runs: the case's code prefix when the answer does not define the entry
    point itself (HumanEval completions), the answer's code, then the tests (and check(entry_point))."""
    if not case.tests:
        raise ValueError("a python_tests case needs 'tests'")
    code = extract_code(answer.content)
    defines = case.entry_point is None or re.search(rf"\bdef\s+{re.escape(case.entry_point)}\s*\(", code)
    parts = [code] if defines or not case.code_prefix else [case.code_prefix + code]
    parts.append(case.tests)
    if case.entry_point and re.search(r"\bdef\s+check\s*\(", case.tests):
        parts.append(f"check({case.entry_point})")
    return "\n\n".join(parts) + "\n"


def score_python_tests(answer: Answer, case: EvalCase) -> Score:
    result = run_python(solution_program(answer, case), timeout_s=case.timeout_s)
    return Score(1.0 if result.passed else 0.0, result.describe()[:300])


SCORERS: dict[ScorerName, Callable[[Answer, EvalCase], Score]] = {
    "exact": score_exact,
    "normalised": score_normalised,
    "regex": score_regex,
    "numeric": score_numeric,
    "choice": score_choice,
    "json_schema": score_json_schema,
    "tool_calls": score_tool_calls,
    "python_tests": score_python_tests,
    "numeric_or_exact": score_numeric_or_exact,
}


def score(answer: Answer, case: EvalCase) -> Score:
    """Score with the case's own scorer."""
    return SCORERS[case.scorer](answer, case)
