"""`qwenkit eval`: scorers on hand cases, reasoning split-off, task generators and loaders, the runner against
a scripted endpoint (thinking-aware scores, 5xx mid-run, a crashing scorer) and against the real server on
the tiny demo models (counts, cache and resume, report files, cut-off-in-thinking), and the CLI."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from qwenkit.cli.app import app
from qwenkit.evals import DatasetError, EvalConfig, EvalError, run_eval
from qwenkit.evals.runner import split_answer
from qwenkit.evals.scorers import Answer, choice_letter, extract_json, final_number, score
from qwenkit.evals.tasks import (
    SYNTHETIC,
    EvalCase,
    load_gsm8k,
    load_humaneval,
    load_jsonl,
    load_mmlu,
    load_tasks,
)
from serve_fixtures import live_server

runner = CliRunner()
USER = [{"role": "user", "content": "q"}]


def case(scorer: str, answer: Any = None, **kw: Any) -> EvalCase:
    return EvalCase(id="c", messages=USER, scorer=scorer, answer=answer, **kw)  # type: ignore[arg-type]


# ---- scorers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so she has 5 left.\n#### 1,234", 1234.0),
        ("#### 42\nThat took 3 steps.", 42.0),  # the #### line wins over a later number
        ("It costs $1,000.50 in all", 1000.5),
        ("half of it: 3/4", 0.75),
        ("1, 2, 3", 3.0),  # a list is not one number with commas
        ("-7 degrees", -7.0),
        ("v2 of the x3 model", None),  # digits inside words are not numbers
        ("no number here", None),
    ],
)
def test_final_number(text: str, expected: float | None) -> None:
    assert final_number(text) == expected


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("Answer: C", "C"),
        ("I first thought (A), but the answer is (B).", "B"),
        ("D. Paris is the capital", "D"),
        ("**J**", "J"),
        ("The answer is E because A is wrong", "E"),
        ("(a) lower-case options are not letters", None),
        ("A cat sat on a mat", None),  # a sentence starting with 'A' is not an option
    ],
)
def test_choice_letter(text: str, letter: str | None) -> None:
    assert choice_letter(text) == letter


def test_text_scorers() -> None:
    assert score(Answer("  Paris \n"), case("exact", "Paris")).value == 1.0
    assert score(Answer("paris"), case("exact", "Paris")).value == 0.0
    assert score(Answer("  the   Eiffel-Tower!"), case("normalised", "The EiffelTower")).value == 1.0
    assert score(Answer("The Eiffel Tower"), case("normalised", "The EiffelTower")).value == 0.0
    assert score(Answer("code: AB-1234."), case("regex", r"[A-Z]{2}-\d{4}")).value == 1.0
    assert score(Answer("code: ab-12"), case("regex", r"[A-Z]{2}-\d{4}")).value == 0.0
    assert score(Answer("#### 12.0"), case("numeric", "12")).value == 1.0
    assert score(Answer("#### 13"), case("numeric", 12)).value == 0.0
    # numeric-or-exact: numbers compare as numbers, the rest as exact text
    assert score(Answer("so... 1,000"), case("numeric_or_exact", "1000")).value == 1.0
    assert score(Answer("blue"), case("numeric_or_exact", "blue")).value == 1.0
    assert score(Answer("Blue"), case("numeric_or_exact", "blue")).value == 0.0
    assert score(Answer("Answer: b"), case("choice", 1)).value == 0.0  # lower case is not read
    assert score(Answer("Answer: B"), case("choice", 1)).value == 1.0


def test_json_schema_scorer() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    c = case("json_schema", schema=schema)
    assert score(Answer('Here you go:\n```json\n{"n": 3}\n```'), c).value == 1.0
    assert score(Answer('prefix {"n": 3} suffix'), c).value == 1.0
    bad = score(Answer('{"n": "three"}'), c)
    assert bad.value == 0.0 and "schema" in bad.detail
    assert score(Answer("no json at all"), c).value == 0.0
    with pytest.raises(ValueError, match="no JSON"):
        extract_json("{broken")


def test_tool_call_scorer_is_order_insensitive_and_reads_json_arguments() -> None:
    want = [{"name": "w", "arguments": {"city": "Oslo"}}, {"name": "w", "arguments": {"city": "Lima"}}]
    c = case("tool_calls", want)
    swapped = [
        {"name": "w", "arguments": '{"city": "Lima"}'},
        {"name": "w", "arguments": '{"city":"Oslo"}'},
    ]
    assert score(Answer("", swapped), c).value == 1.0
    assert score(Answer("", swapped[:1]), c).value == 0.0
    wrong = [{"name": "w", "arguments": '{"city": "Lima"}'}, {"name": "w", "arguments": '{"city": "Rome"}'}]
    assert score(Answer("", wrong), c).value == 0.0
    assert (
        score(Answer("", [{"name": "w", "arguments": "{not json"}]), case("tool_calls", want[0])).value == 0.0
    )
    assert score(Answer("", []), c).detail.startswith("called nothing")


def test_scorer_on_a_malformed_case_raises() -> None:
    with pytest.raises(ValueError, match="letter"):
        score(Answer("Answer: A"), case("choice", "Z"))
    with pytest.raises(ValueError, match="not a number"):
        score(Answer("3"), case("numeric", "three"))


# ---- splitting reasoning ---------------------------------------------------------------------------------


def test_split_answer_from_reasoning_content_and_inline_think() -> None:
    served = {"message": {"content": "#### 4", "reasoning_content": "2+2"}, "finish_reason": "stop"}
    split = split_answer(served)
    assert (split.answer.content, split.answer.reasoning, split.in_thinking) == ("#### 4", "2+2", False)
    inline = {"message": {"content": "<think>\nthe 7 apples\n</think>\n\n#### 4"}, "finish_reason": "stop"}
    split = split_answer(inline)
    assert split.answer.content == "#### 4" and split.answer.reasoning == "the 7 apples"
    opened = {"message": {"content": "thinking 9\n</think>\n\n#### 4"}, "finish_reason": "stop"}
    assert split_answer(opened).answer.content == "#### 4"  # the prompt opened the block (2507 Thinking)
    cut = {"message": {"content": "<think>\nstill 9 going"}, "finish_reason": "length"}
    split = split_answer(cut)
    assert split.in_thinking and split.answer.content == "" and "9" in split.answer.reasoning
    cut_served = {"message": {"content": None, "reasoning_content": "still"}, "finish_reason": "length"}
    assert split_answer(cut_served).in_thinking
    cut_answer = {"message": {"content": "#### 1", "reasoning_content": "done"}, "finish_reason": "length"}
    assert not split_answer(cut_answer).in_thinking


def test_split_answer_reads_tool_calls_in_content_and_in_the_message() -> None:
    call = '{"name": "w", "arguments": {"city": "Oslo"}}'
    text = f"<think>\nweather\n</think>\n\n<tool_call>\n{call}\n</tool_call>"
    split = split_answer({"message": {"content": text}, "finish_reason": "stop"})
    assert [(c["name"], json.loads(c["arguments"])) for c in split.answer.tool_calls] == [
        ("w", {"city": "Oslo"})
    ]
    served = {
        "message": {"content": None, "tool_calls": [{"function": {"name": "w", "arguments": "{}"}}]},
        "finish_reason": "tool_calls",
    }
    assert split_answer(served).answer.tool_calls == [{"name": "w", "arguments": "{}"}]


# ---- tasks -----------------------------------------------------------------------------------------------


def test_synthetic_tasks_are_deterministic_per_seed() -> None:
    for name, make in SYNTHETIC.items():
        first, again, other = make(1, 6), make(1, 6), make(2, 6)
        assert [c.model_dump() for c in first] == [c.model_dump() for c in again], name
        assert [c.model_dump() for c in first] != [c.model_dump() for c in other], name
        assert len(first) == 6 and len({c.id for c in first}) == 6


def test_synthetic_cases_are_answerable() -> None:
    import jsonschema

    for c in SYNTHETIC["mc"](3, 10):
        prompt = c.messages[0]["content"]
        place = re.search(r"What is the .+ of (\w+)\?", prompt).group(1)  # type: ignore[union-attr]
        value = re.search(rf"of {place} is (\w+)\.", prompt).group(1)  # type: ignore[union-attr]
        assert re.search(rf"^{c.answer}\. {value}$", prompt, re.MULTILINE)
    for c in SYNTHETIC["arith"](3, 10):
        numbers = [int(n) for n in re.findall(r"\d+", c.messages[0]["content"])]
        assert isinstance(c.answer, int) and numbers
    for c in SYNTHETIC["json"](3, 5):
        jsonschema.Draft202012Validator.check_schema(c.schema_)
    for c in SYNTHETIC["tools"](3, 6):
        names = {t["function"]["name"] for t in c.tools or []}
        assert {call["name"] for call in c.answer} <= names


def test_loaders_read_the_common_formats(tmp_path: Path) -> None:
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "2+2?", "answer": "2+2=4\n#### 4"}) + "\n\n")
    [g] = load_gsm8k(gsm)
    assert g.scorer == "numeric" and g.answer == "4" and "2+2?" in g.messages[0]["content"]
    mmlu = tmp_path / "mmlu.csv"
    mmlu.write_text('"Which, of these?",one,two,three,four,C\n')
    [m] = load_mmlu(mmlu)
    assert (
        m.answer == "C"
        and "C. three" in m.messages[0]["content"]
        and "Which, of these?" in m.messages[0]["content"]
    )
    he = tmp_path / "he.jsonl"
    row = {"task_id": "HE/0", "prompt": "def f():\n", "test": "def check(c): pass", "entry_point": "f"}
    he.write_text(json.dumps(row) + "\n")
    [h] = load_humaneval(he)
    assert (h.id, h.entry_point, h.code_prefix, h.scorer) == ("HE/0", "f", "def f():\n", "python_tests")
    user = tmp_path / "mine.jsonl"
    lines = [
        {"prompt": "capital of France?", "answer": "Paris"},
        {"messages": USER, "answer": "B", "scorer": "choice", "id": 7},
        {"prompt": "p", "schema": {"type": "object"}},
        {"prompt": "p", "tests": "assert True"},
        {"prompt": "p", "tools": [], "answer": [{"name": "x", "arguments": {}}]},
    ]
    user.write_text("\n".join(json.dumps(x) for x in lines))
    cases = load_jsonl(user)
    assert [c.scorer for c in cases] == [
        "numeric_or_exact",
        "choice",
        "json_schema",
        "python_tests",
        "tool_calls",
    ]
    assert cases[0].messages == [{"role": "user", "content": "capital of France?"}] and cases[1].id == "7"


@pytest.mark.parametrize(
    ("loader", "name", "text", "message"),
    [
        (
            load_jsonl,
            "a.jsonl",
            '{"prompt": "ok", "answer": 1}\n{"prompt": oops}\n',
            r"a\.jsonl:2: not valid JSON",
        ),
        (load_jsonl, "a.jsonl", '{"prompt": "ok"}\n\n[1]\n', r"a\.jsonl:3: expected a JSON object"),
        (load_jsonl, "a.jsonl", '{"answer": 1}\n', r"a\.jsonl:1: give either"),
        (
            load_jsonl,
            "a.jsonl",
            '{"prompt": "p", "scorer": "magic"}\n',
            r"a\.jsonl:1: unknown scorer 'magic'",
        ),
        (load_jsonl, "a.jsonl", '{"prompt": "p", "colour": 1}\n', r"a\.jsonl:1: colour"),
        (load_gsm8k, "g.jsonl", '{"question": "q", "answer": "4"}\n', r"g\.jsonl:1: .*####"),
        (load_mmlu, "m.csv", "q,a,b,c,d,A\nq,a,b,c,d\n", r"m\.csv:2: "),
        (load_mmlu, "m.csv", "q,a,b,c,d,E\n", r"m\.csv:1: "),
        (load_humaneval, "h.jsonl", '{"prompt": "p"}\n', r"h\.jsonl:1: "),
    ],
)
def test_malformed_lines_name_file_and_line(
    tmp_path: Path, loader: Callable[[Path], list[EvalCase]], name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        loader(path)


def test_load_tasks_specs(tmp_path: Path) -> None:
    data = tmp_path / "qa.jsonl"
    data.write_text('{"prompt": "a", "answer": 1}\n{"prompt": "b", "answer": 2}\n')
    tasks = load_tasks(["arith", "jsonl:" + str(data)], data, seed=0, limit=1)
    assert [t.name for t in tasks] == ["arith", "qa", "qa-2"]
    assert [len(t.cases) for t in tasks] == [1, 1, 1]
    assert [t.name for t in load_tasks([], data)] == ["qa"]  # --data alone runs only the file
    assert [t.name for t in load_tasks([], None, limit=2)] == list(SYNTHETIC)
    with pytest.raises(DatasetError, match="unknown task 'nope'"):
        load_tasks(["nope"])
    with pytest.raises(DatasetError, match="gsm8k:PATH"):
        load_tasks(["gsm8k"])
    with pytest.raises(DatasetError, match="no such file"):
        load_tasks(["mmlu:" + str(tmp_path / "missing.csv")])


# ---- the runner against a scripted endpoint --------------------------------------------------------------


class Scripted(BaseHTTPRequestHandler):
    """An OpenAI-style endpoint whose answer depends on the question: for what a real model cannot be made
    to write (a right answer behind reasoning, a 500 mid-run)."""

    requests: list[dict[str, Any]]
    split: bool  # answer with reasoning_content (else inline <think> in content)

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.requests.append(body)
        question = body["messages"][-1]["content"]
        if "FAIL" in question:
            return self._send(500, {"error": {"message": "boom", "type": "server_error"}})
        if "LONG" in question:  # cut off while thinking; the reasoning mentions the answer
            reasoning, answer, finish = "the answer is 4 and", None, "length"
        elif "capital" in question:  # exact scoring: only the text after the reasoning may count
            reasoning, answer, finish = "Lyon? no, wrong: 99, 98, 97", "Paris", "stop"
        else:
            reasoning, answer, finish = "wrong: 99, 98, 97", "#### 4", "stop"
        if self.split:
            message = {"role": "assistant", "content": answer, "reasoning_content": reasoning}
        else:
            message = {
                "role": "assistant",
                "content": f"<think>\n{reasoning}" + (f"\n</think>\n\n{answer}" if answer else ""),
            }
        usage = {
            "prompt_tokens": 5,
            "completion_tokens": 7,
            "completion_tokens_details": {"reasoning_tokens": 5},
        }
        self._send(
            200, {"choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage}
        )


@pytest.fixture
def scripted() -> Iterator[Callable[[bool], tuple[str, list[dict[str, Any]]]]]:
    servers: list[ThreadingHTTPServer] = []

    def start(split: bool) -> tuple[str, list[dict[str, Any]]]:
        seen: list[dict[str, Any]] = []
        handler = type("H", (Scripted,), {"requests": seen, "split": split})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("split", [True, False], ids=["reasoning_content", "inline-think"])
def test_thinking_aware_scoring_errors_and_a_crashing_scorer(
    tmp_path: Path, scripted: Callable[[bool], tuple[str, list[dict[str, Any]]]], split: bool
) -> None:
    url, seen = scripted(split)
    data = tmp_path / "cases.jsonl"
    rows = [
        {"prompt": "2+2?", "answer": 4},
        {"prompt": "2+2 again?", "answer": "4"},
        {"prompt": "LONG 2+2?", "answer": 4},  # cut off in thinking: the 4 in its reasoning must not count
        {"prompt": "FAIL", "answer": 4},  # the server answers 500
        {"prompt": "bad case", "answer": "Q", "scorer": "choice"},  # the scorer raises on this case
        {"prompt": "capital of France?", "answer": "Paris"},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    config = EvalConfig(
        base_url=url, data=data, cache_dir=tmp_path / "cache", out=tmp_path / "out", thinking=True
    )
    report = run_eval(config)
    task = report.tasks["cases"]
    by_id = {s.id: s for s in report.samples}
    assert [by_id[f"cases-{i}"].score for i in range(1, 7)] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert task.n == 6 and task.score == pytest.approx(3 / 6) and task.errors == 2
    assert by_id["cases-4"].error == "HTTP 500: boom"
    assert by_id["cases-5"].error is not None and "scorer choice failed" in by_id["cases-5"].error
    assert by_id["cases-3"].cut_off_in_thinking and by_id["cases-3"].cut_off
    assert task.cut_off_rate == task.cut_off_in_thinking_rate == pytest.approx(1 / 6)
    assert task.reasoning_chars_p50 == len("wrong: 99, 98, 97") and task.reasoning_tokens_mean == 5
    assert len(seen) == 6 and seen[0]["chat_template_kwargs"] == {"enable_thinking": True}
    assert seen[0]["model"] == "scripted" and seen[0]["temperature"] == 0.0
    # resumed: only the failed request is asked again; errors are never cached
    again = run_eval(config)
    assert again.requests_sent == 1 and len(seen) == 7 and again.answers_from_cache == 5
    assert [s.score for s in again.samples] == [s.score for s in report.samples]
    # other generation parameters are other answers
    run_eval(config.model_copy(update={"max_tokens": 77}))
    assert len(seen) == 13 and seen[-1]["max_tokens"] == 77


def test_unreachable_endpoint_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match=r"cannot reach http://127\.0\.0\.1:9"):
        run_eval(EvalConfig(base_url="http://127.0.0.1:9/v1", tasks=["arith"], cache_dir=tmp_path))
    with pytest.raises(EvalError, match="http://"):
        run_eval(EvalConfig(base_url="localhost:8000", tasks=["arith"], cache_dir=tmp_path))


# ---- the real server on the tiny demo models -------------------------------------------------------------


def _served_requests(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("qwenkit_requests_total{") and "chat/completions" in line
    )


def test_end_to_end_against_qwenkit_serve(
    tmp_path: Path, demo_gguf: Callable[..., Path], demo_checkpoint: Callable[..., Path]
) -> None:
    with live_server(demo_gguf("qwen3", "tiny", "f32"), demo_checkpoint("qwen3", "tiny")) as server:
        config = EvalConfig(
            base_url=server.base_url + "/v1",
            tasks=["arith", "mc", "tools"],
            limit=3,
            max_tokens=6,
            concurrency=3,
            out=tmp_path / "out",
            cache_dir=tmp_path / "cache",
        )
        done: list[tuple[int, int]] = []
        report = run_eval(config, progress=lambda d, t: done.append((d, t)))
        assert _served_requests(server.base_url) == 9 and report.requests_sent == 9
        assert {name: t.n for name, t in report.tasks.items()} == {"arith": 3, "mc": 3, "tools": 3}
        assert done[-1] == (9, 9)
        for s in report.samples:
            assert s.error is None and s.completion_tokens is not None and s.completion_tokens <= 6
            assert s.cut_off == (s.finish_reason == "length")
            assert (
                not s.cut_off_in_thinking
            )  # this hybrid model never opened <think>: nothing was cut inside it
        assert report.model == "qwen3-demo"
        saved = json.loads((tmp_path / "out" / "eval.json").read_text())
        assert saved["tasks"]["mc"]["n"] == 3 and len(saved["samples"]) == 9
        html = (tmp_path / "out" / "eval.html").read_text()
        assert "<h2>tools</h2>" in html and "<script" not in html
        assert not list((tmp_path / "out").glob(".*tmp"))
        # second run: everything from the cache, the server is asked nothing
        again = run_eval(config)
        assert again.requests_sent == 0 and again.answers_from_cache == 9
        assert _served_requests(server.base_url) == 9
        assert [s.content for s in again.samples] == [s.content for s in report.samples]
        # --no-cache asks again
        run_eval(config.model_copy(update={"cache": False, "tasks": ["arith"]}))
        assert _served_requests(server.base_url) == 12


def test_cli_model_counts_answers_cut_off_inside_thinking(
    tmp_path: Path, demo_checkpoint: Callable[..., Path]
) -> None:
    # Qwen3.5's prompt opens <think>; 8 random tokens never close it: every answer is cut off inside thinking.
    checkpoint = demo_checkpoint("qwen3_5", "tiny")
    args = ["eval", "--model", str(checkpoint), "--tasks", "arith", "--limit", "2", "--max-tokens", "8"]
    result = runner.invoke(app, [*args, "--threads", "1", "--out", str(tmp_path), "--no-cache"])
    assert result.exit_code == 0, result.stderr
    assert "arith" in result.stdout and "2 requests" in result.stdout
    task = json.loads((tmp_path / "eval.json").read_text())["tasks"]["arith"]
    assert task["n"] == 2 and task["cut_off_in_thinking_rate"] == 1.0 and task["reasoning_chars_mean"] > 0
    assert task["score"] == 0.0


# ---- CLI -------------------------------------------------------------------------------------------------


def test_cli_help_and_bad_input(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "--help"])
    assert result.exit_code == 0 and "--base-url" in result.stdout and "humaneval:PATH" in result.stdout

    def fails(*args: str) -> str:
        result = runner.invoke(app, ["eval", *args])
        assert result.exit_code == 2, result.stdout
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        return result.stderr

    assert "give --model" in fails("--tasks", "arith")
    assert "not both" in fails("--model", "x", "--base-url", "http://127.0.0.1:9")
    assert "unknown task 'trivia'" in fails("--base-url", "http://127.0.0.1:9", "--tasks", "trivia")
    assert "cannot reach" in fails("--base-url", "http://127.0.0.1:9", "--tasks", "arith")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": 1}\nnot json\n')
    assert "bad.jsonl:2: not valid JSON" in fails("--base-url", "http://127.0.0.1:9", "--data", str(bad))
    assert "no such file" in fails("--base-url", "http://127.0.0.1:9", "--data", str(tmp_path / "none.jsonl"))
