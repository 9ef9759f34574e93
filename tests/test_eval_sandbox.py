"""The eval sandbox: a correct solution passes, a failing one fails, an infinite loop and an unbounded
allocation are stopped at their limits, children die with the run, and the code sees no env or network."""

from __future__ import annotations

import os
import time

from qwenkit.evals.sandbox import run_python
from qwenkit.evals.scorers import Answer, score
from qwenkit.evals.tasks import EvalCase


def test_correct_solution_passes() -> None:
    result = run_python("def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n")
    assert result.passed, result.describe()
    assert result.stdout.strip() == "ok"


def test_failing_assert_fails_with_the_error() -> None:
    result = run_python("assert 1 + 1 == 3, 'arithmetic'\n")
    assert not result.passed
    assert result.outcome == "failed"
    assert "AssertionError: arithmetic" in result.describe()


def test_infinite_loop_is_killed_at_the_time_limit() -> None:
    result = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert result.outcome in ("timeout", "cpu")
    assert not result.passed


def test_unbounded_allocation_is_stopped_at_the_memory_limit() -> None:
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))\n"
    result = run_python(code, timeout_s=20.0, memory_mb=256)
    assert result.outcome == "memory", result
    assert "memory limit" in result.describe()


def test_child_processes_die_with_the_run() -> None:
    # The solution forks a sleeper that writes its pid, then loops: the whole group goes at the limit.
    code = (
        "import os, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "while True:\n"
        "    pass\n"
    )
    result = run_python(code, timeout_s=1.0)
    assert result.outcome == "timeout"
    child = int(result.stdout.split()[0])
    for _ in range(50):  # the kill is immediate; reaping by init may take a moment
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{child}/stat") as f:
            if f.read().split()[2] == "Z":
                break
        time.sleep(0.05)
    else:
        raise AssertionError(f"child {child} still running")


def test_no_environment_no_network_and_a_temp_cwd() -> None:
    os.environ["QWENKIT_SANDBOX_SECRET"] = "leak"
    try:
        code = (
            "import os, socket\n"
            "assert 'QWENKIT_SANDBOX_SECRET' not in os.environ\n"
            "assert os.path.basename(os.getcwd()).startswith('qwenkit-sandbox-')\n"
            "try:\n"
            "    socket.create_connection(('127.0.0.1', 9))\n"
            "except OSError as exc:\n"
            "    assert 'disabled' in str(exc)\n"
            "else:\n"
            "    raise SystemExit('network worked')\n"
        )
        result = run_python(code)
    finally:
        del os.environ["QWENKIT_SANDBOX_SECRET"]
    assert result.passed, result.describe()


def test_python_tests_scorer_runs_humaneval_style_cases() -> None:
    case = EvalCase(
        id="h",
        messages=[{"role": "user", "content": "x"}],
        scorer="python_tests",
        code_prefix="def inc(x):\n    ",
        tests="def check(candidate):\n    assert candidate(1) == 2\n",
        entry_point="inc",
    )
    # a body completion gets the prompt prepended; a whole function is used as is
    assert score(Answer("return x + 1\n"), case).value == 1.0
    assert score(Answer("```python\ndef inc(x):\n    return x + 1\n```"), case).value == 1.0
    assert score(Answer("```python\ndef inc(x):\n    return x\n```"), case).value == 0.0
    looping = score(
        Answer("```python\ndef inc(x):\n    while True: pass\n```"), case.model_copy(update={"timeout_s": 1})
    )
    assert looping.value == 0.0 and "limit" in looping.detail
