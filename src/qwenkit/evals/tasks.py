"""Eval tasks: built-in synthetic tasks generated from a seed, user JSONL, and GSM8K / MMLU / HumanEval files.

Contract: load_tasks(specs, data, seed) turns `--tasks` items ("arith", "gsm8k:PATH", "jsonl:PATH", ...)
and `--data FILE` into Tasks, each a name and a list of EvalCases (chat messages, expected answer, scorer
and what the scorer needs). Synthetic tasks (SYNTHETIC) need no download and are the same for the same
seed. A file that cannot be read, or a malformed line, raises DatasetError naming the file and line.
User JSONL: one case a line, {"messages": [...]} or {"prompt": "..."}, "answer", optional "scorer",
"tools", "schema", "tests", "entry_point", "id"; without "scorer" it is inferred (tests -> python_tests,
schema -> json_schema, tools -> tool_calls), else numeric_or_exact.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qwenkit.evals.scorers import LETTERS, ScorerName


class DatasetError(ValueError):
    """A task file that cannot be used; the message names the file (and line) and the fix."""


class EvalCase(BaseModel):
    """One question: the chat to send, the expected answer and the scorer that compares them."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    id: str
    messages: list[dict[str, Any]]
    answer: Any = None
    scorer: ScorerName = "numeric_or_exact"
    tools: list[dict[str, Any]] | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    tests: str | None = None
    entry_point: str | None = None
    code_prefix: str | None = None  # HumanEval: the prompt, prepended when the answer is a function body
    timeout_s: float = 10.0

    def fingerprint(self) -> str:
        """A hash of everything that defines the case (for the answer cache)."""
        data = json.dumps(self.model_dump(by_alias=True), sort_keys=True, default=str)
        return hashlib.sha256(data.encode()).hexdigest()[:24]


class Task(BaseModel):
    name: str
    cases: list[EvalCase]


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# ---- synthetic tasks -------------------------------------------------------------------------------------

DEFAULT_SYNTHETIC_CASES = 20


def _rng(task: str, seed: int) -> random.Random:
    return random.Random(f"qwenkit-eval:{task}:{seed}")


def synth_arith(seed: int, n: int = DEFAULT_SYNTHETIC_CASES) -> list[EvalCase]:
    """Two-step integer word problems; answer with `#### N`."""
    rng = _rng("arith", seed)
    cases = []
    for i in range(n):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        kind = rng.choice(("buy", "share", "grow"))
        if kind == "buy":
            text = (
                f"Ana has {a} apples. She buys {b} more, then gives away {c}. How many apples does she have?"
            )
            answer = a + b - c
        elif kind == "share":
            text = (
                f"{c} friends share {a * c} marbles equally and each then finds {b} more. How many has each?"
            )
            answer = a + b
        else:
            text = f"A plant is {a} cm tall and grows {c} cm a day for {b} days. How tall is it then, in cm?"
            answer = a + b * c
        prompt = f"{text}\nThink step by step, then give the final answer on its own line as '#### <number>'."
        cases.append(EvalCase(id=f"arith-{i}", messages=_user(prompt), answer=answer, scorer="numeric"))
    return cases


_SYLLABLES = ("ka", "lo", "mi", "zu", "re", "ta", "vo", "ni", "sha", "qe", "dor", "pel")
_ATTRIBUTES = (
    ("capital", "city"),
    ("favourite colour", "colour"),
    ("chief export", "good"),
)
_VALUES = {
    "city": ("Orvane", "Tessel", "Brimhold", "Quarry", "Lumen", "Saltmere", "Vey", "Corrin"),
    "colour": ("teal", "amber", "violet", "crimson", "ochre", "silver", "jade", "indigo"),
    "good": ("salt", "timber", "copper", "wool", "glass", "tea", "silk", "iron"),
}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(3)).capitalize()


def synth_mc(seed: int, n: int = DEFAULT_SYNTHETIC_CASES) -> list[EvalCase]:
    """Multiple choice over made-up facts stated in the prompt (reading, not memory)."""
    rng = _rng("mc", seed)
    cases = []
    for i in range(n):
        attribute, kind = rng.choice(_ATTRIBUTES)
        places = []
        while len(places) < 4:
            name = _word(rng)
            if name not in places:
                places.append(name)
        values = rng.sample(_VALUES[kind], 4)
        facts = " ".join(f"The {attribute} of {p} is {v}." for p, v in zip(places, values, strict=True))
        target = rng.randrange(4)
        options = rng.sample(values, 4)
        lines = "\n".join(f"{LETTERS[j]}. {v}" for j, v in enumerate(options))
        prompt = (
            f"{facts}\nWhat is the {attribute} of {places[target]}?\n{lines}\nReply with 'Answer: <letter>'."
        )
        answer = LETTERS[options.index(values[target])]
        cases.append(EvalCase(id=f"mc-{i}", messages=_user(prompt), answer=answer, scorer="choice"))
    return cases


_JSON_FIELDS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("name", {"type": "string", "minLength": 1}, "a name (string)"),
    ("age", {"type": "integer", "minimum": 0, "maximum": 120}, "an age (integer 0-120)"),
    ("email", {"type": "string", "pattern": "^[^@ ]+@[^@ ]+$"}, "an email address"),
    ("tags", {"type": "array", "items": {"type": "string"}, "minItems": 1}, "a non-empty list of tags"),
    ("active", {"type": "boolean"}, "whether it is active (boolean)"),
    ("score", {"type": "number", "minimum": 0, "maximum": 1}, "a score between 0 and 1"),
    ("city", {"type": "string"}, "a city"),
)


def synth_json(seed: int, n: int = DEFAULT_SYNTHETIC_CASES) -> list[EvalCase]:
    """Produce a JSON object matching a schema of 2-4 fields picked from the seed."""
    rng = _rng("json", seed)
    cases = []
    for i in range(n):
        picked = rng.sample(_JSON_FIELDS, rng.randint(2, 4))
        schema = {
            "type": "object",
            "properties": {name: spec for name, spec, _ in picked},
            "required": [name for name, _, _ in picked],
            "additionalProperties": False,
        }
        wanted = "; ".join(f'"{name}": {what}' for name, _, what in picked)
        prompt = (
            f"Invent a record and reply with only a JSON object with exactly these keys: {wanted}.\n"
            f"JSON schema: {json.dumps(schema)}"
        )
        cases.append(EvalCase(id=f"json-{i}", messages=_user(prompt), schema=schema, scorer="json_schema"))
    return cases


def _tool(name: str, description: str, props: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": props, "required": list(props)},
        },
    }


_TOOLS = [
    _tool("get_weather", "Current weather in a city.", {"city": {"type": "string"}}),
    _tool(
        "convert_currency",
        "Convert an amount between currencies.",
        {"amount": {"type": "number"}, "from": {"type": "string"}, "to": {"type": "string"}},
    ),
    _tool("set_timer", "Start a timer.", {"minutes": {"type": "integer"}}),
]
_CITIES = ("Paris", "Lima", "Oslo", "Cairo", "Hanoi", "Quito", "Perth", "Dakar")
_CURRENCIES = ("USD", "EUR", "JPY", "GBP", "CHF", "INR")


def synth_tools(seed: int, n: int = DEFAULT_SYNTHETIC_CASES) -> list[EvalCase]:
    """Call the right tool(s) with the right arguments; every third case needs two parallel calls."""
    rng = _rng("tools", seed)
    cases = []
    for i in range(n):
        city, other = rng.sample(_CITIES, 2)
        amount, minutes = rng.randint(2, 500), rng.randint(1, 90)
        src, dst = rng.sample(_CURRENCIES, 2)
        kind = rng.choice(("weather", "money", "timer")) if i % 3 else "two"
        if kind == "weather":
            text, calls = f"What's the weather in {city} right now?", [("get_weather", {"city": city})]
        elif kind == "money":
            text = f"How much is {amount} {src} in {dst}?"
            calls = [("convert_currency", {"amount": amount, "from": src, "to": dst})]
        elif kind == "timer":
            text, calls = f"Set a timer for {minutes} minutes.", [("set_timer", {"minutes": minutes})]
        else:
            text = f"What's the weather in {city} and in {other}?"
            calls = [("get_weather", {"city": city}), ("get_weather", {"city": other})]
        answer = [{"name": name, "arguments": args} for name, args in calls]
        cases.append(
            EvalCase(id=f"tools-{i}", messages=_user(text), tools=_TOOLS, answer=answer, scorer="tool_calls")
        )
    return cases


def _code_add(r: random.Random) -> tuple[str, str, str]:
    k = r.randint(2, 9)
    tests = "\n".join(f"assert add_{k}({x}) == {x + k}" for x in (0, 5, -3))
    return f"add_{k}", f"takes an integer x and returns x + {k}", tests


def _code_repeat(r: random.Random) -> tuple[str, str, str]:
    k = r.randint(2, 5)
    tests = "\n".join(f"assert repeat_{k}({s!r}) == {s * k!r}" for s in ("ab", "", "x"))
    return f"repeat_{k}", f"takes a string s and returns s repeated {k} times", tests


def _code_count(r: random.Random) -> tuple[str, str, str]:
    v = r.choice("aeiou")
    tests = "\n".join(f"assert count_{v}({s!r}) == {s.count(v)}" for s in (f"{v}b{v}", "xyz", v * 3))
    return f"count_{v}", f"takes a string s and returns how many times the letter '{v}' occurs in it", tests


def _code_scaled_sum(r: random.Random) -> tuple[str, str, str]:
    k = r.randint(2, 6)
    tests = "\n".join(f"assert scaled_sum_{k}({xs}) == {sum(xs) * k}" for xs in ([1, 2, 3], [], [-4]))
    return f"scaled_sum_{k}", f"takes a list of integers and returns their sum times {k}", tests


_CODE_TEMPLATES = (_code_add, _code_repeat, _code_count, _code_scaled_sum)


def synth_code(seed: int, n: int = DEFAULT_SYNTHETIC_CASES) -> list[EvalCase]:
    """Write a tiny Python function; unit tests (asserts) run in the sandbox."""
    rng = _rng("code", seed)
    cases = []
    for i in range(n):
        name, what, tests = rng.choice(_CODE_TEMPLATES)(rng)
        prompt = f"Write a Python function `{name}` that {what}. Reply with the code in a ```python block."
        cases.append(
            EvalCase(
                id=f"code-{i}", messages=_user(prompt), tests=tests, entry_point=name, scorer="python_tests"
            )
        )
    return cases


SYNTHETIC: dict[str, Callable[[int, int], list[EvalCase]]] = {
    "arith": synth_arith,
    "mc": synth_mc,
    "json": synth_json,
    "tools": synth_tools,
    "code": synth_code,
}


# ---- files -----------------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text("utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file; check the path") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read it ({exc.strerror})") from None


def _json_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    if not rows:
        raise DatasetError(f"{path}: no cases in the file")
    return rows


def _infer_scorer(row: dict[str, Any]) -> str:
    if "scorer" in row:
        return str(row["scorer"])
    if "tests" in row:
        return "python_tests"
    if "schema" in row:
        return "json_schema"
    if "tools" in row and isinstance(row.get("answer"), list | dict):
        return "tool_calls"
    return "numeric_or_exact"


def load_jsonl(path: Path) -> list[EvalCase]:
    """User JSONL: see the module docstring."""
    scorers = get_args(ScorerName)
    cases = []
    for number, row in _json_lines(path):
        where = f"{path}:{number}"
        if ("messages" in row) == ("prompt" in row):
            raise DatasetError(f'{where}: give either "messages" (a chat) or "prompt" (a string)')
        scorer = _infer_scorer(row)
        if scorer not in scorers:
            raise DatasetError(f"{where}: unknown scorer {scorer!r}; use one of {', '.join(scorers)}")
        messages = row.pop("messages", None) or _user(str(row.pop("prompt", "")))
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise DatasetError(f'{where}: "messages" must be a list of {{"role": ..., "content": ...}}')
        row.setdefault("id", f"{path.stem}-{number}")
        row["id"] = str(row["id"])
        try:
            cases.append(
                EvalCase(messages=messages, scorer=scorer, **{k: v for k, v in row.items() if k != "scorer"})
            )
        except (ValidationError, TypeError) as exc:
            raise DatasetError(f"{where}: {_first_error(exc)}") from None
    return cases


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"{'.'.join(str(p) for p in first['loc']) or 'case'}: {first['msg']}"
    return str(exc)


def load_gsm8k(path: Path) -> list[EvalCase]:
    """GSM8K jsonl: {"question": ..., "answer": "... #### 42"}."""
    cases = []
    for number, row in _json_lines(path):
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not isinstance(answer, str) or "####" not in answer:
            raise DatasetError(
                f'{path}:{number}: a GSM8K line needs "question" and an "answer" with "#### N"'
            )
        prompt = f"{question}\nSolve it step by step, then give the final answer as '#### <number>'."
        final = answer.rsplit("####", 1)[1].strip()
        cases.append(EvalCase(id=f"gsm8k-{number}", messages=_user(prompt), answer=final, scorer="numeric"))
    return cases


def load_mmlu(path: Path) -> list[EvalCase]:
    """MMLU csv without a header: question,A,B,C,D,answer (a letter)."""
    lines = _read_lines(path)
    cases = []
    for number, row in enumerate(csv.reader(lines), start=1):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) != 6 or row[5].strip().upper() not in LETTERS[:4]:
            raise DatasetError(f"{path}:{number}: an MMLU row is question,A,B,C,D,answer (answer A-D)")
        question, *options, answer = row
        listed = "\n".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(options))
        prompt = f"{question}\n{listed}\nReply with 'Answer: <letter>'."
        cases.append(
            EvalCase(
                id=f"mmlu-{number}", messages=_user(prompt), answer=answer.strip().upper(), scorer="choice"
            )
        )
    if not cases:
        raise DatasetError(f"{path}: no rows in the file")
    return cases


def load_humaneval(path: Path) -> list[EvalCase]:
    """HumanEval jsonl: {"task_id", "prompt", "test", "entry_point"}; the tests call check(entry_point)."""
    cases = []
    for number, row in _json_lines(path):
        prompt, test, entry = row.get("prompt"), row.get("test"), row.get("entry_point")
        if not all(isinstance(v, str) and v for v in (prompt, test, entry)):
            raise DatasetError(f'{path}:{number}: a HumanEval line needs "prompt", "test" and "entry_point"')
        assert isinstance(prompt, str) and isinstance(test, str) and isinstance(entry, str)
        ask = (
            f"Complete this Python function. Reply with the whole function in a ```python block.\n\n{prompt}"
        )
        cases.append(
            EvalCase(
                id=str(row.get("task_id") or f"humaneval-{number}"),
                messages=_user(ask),
                tests=test,
                entry_point=entry,
                code_prefix=prompt,
                scorer="python_tests",
            )
        )
    return cases


LOADERS: dict[str, Callable[[Path], list[EvalCase]]] = {
    "jsonl": load_jsonl,
    "gsm8k": load_gsm8k,
    "mmlu": load_mmlu,
    "humaneval": load_humaneval,
}


def _parse_spec(spec: str) -> tuple[str, Path | None]:
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind in SYNTHETIC and not sep:
        return kind, None
    if kind in LOADERS:
        if not rest.strip():
            raise DatasetError(f"--tasks {spec}: give the file as {kind}:PATH")
        return kind, Path(rest.strip()).expanduser()
    known = ", ".join([*SYNTHETIC, *(f"{k}:PATH" for k in LOADERS)])
    raise DatasetError(f"unknown task {spec!r}; use one of {known}")


def load_tasks(
    specs: list[str], data: Path | None = None, seed: int = 0, limit: int | None = None
) -> list[Task]:
    """The tasks to run; no specs and no data: every synthetic task. limit: the first N cases of each."""
    if not specs and data is None:
        specs = list(SYNTHETIC)
    n = limit or DEFAULT_SYNTHETIC_CASES
    tasks: list[Task] = []
    for spec in specs:
        kind, path = _parse_spec(spec)
        if path is None:
            cases = SYNTHETIC[kind](seed, n)
            name = kind
        else:
            cases = LOADERS[kind](path)
            name = f"{kind}:{path.name}" if kind != "jsonl" else path.stem
        tasks.append(Task(name=_unique(name, tasks), cases=cases[:limit] if limit else cases))
    if data is not None:
        cases = load_jsonl(data)
        tasks.append(Task(name=_unique(data.stem, tasks), cases=cases[:limit] if limit else cases))
    return tasks


def _unique(name: str, tasks: list[Task]) -> str:
    taken = {t.name for t in tasks}
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    return out
