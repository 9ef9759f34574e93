"""Run untrusted Python (a model's solution plus its unit tests) in a limited subprocess.

Contract: run_python(code) writes code to a fresh temp directory and runs it there with `python -I -B`
in its own process group, with an empty environment (no proxies, no PYTHONPATH), RLIMIT_AS (memory),
RLIMIT_CPU, RLIMIT_FSIZE and no core files set inside the child before the code runs, and sockets
disabled (best effort, not a jail). At the wall timeout the whole process group is killed. The result
says whether it passed (exit 0), and if not why: "timeout", "cpu", "memory" or "exit N", with the tail
of stderr. Never raises for anything the code does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 512
TAIL = 2000

# Runs in the child before the solution: limits first, then no sockets, then the file as __main__.
_BOOTSTRAP = """
import resource, runpy, socket, sys
mem = {memory} * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu} + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024, 16 * 1024 * 1024))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
socket.socket = _no_network
socket.create_connection = _no_network
sys.argv = ["solution.py"]
sys.path.insert(0, ".")
runpy.run_path("solution.py", run_name="__main__")
"""

Outcome = Literal["passed", "failed", "timeout", "cpu", "memory"]


@dataclass(frozen=True)
class SandboxResult:
    """How a sandboxed run ended: outcome, exit code (None when killed at the wall timeout), stderr tail."""

    outcome: Outcome
    returncode: int | None
    stderr: str
    stdout: str

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"

    def describe(self) -> str:
        """One line: why it failed (the last line of stderr), or 'passed'."""
        if self.passed:
            return "passed"
        last = next((line for line in reversed(self.stderr.splitlines()) if line.strip()), "")
        why = {
            "timeout": "killed at the wall-time limit",
            "cpu": "killed at the CPU-time limit",
            "memory": "stopped at the memory limit",
        }.get(self.outcome, f"exit {self.returncode}")
        return f"{why}: {last}" if last else why


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_python(
    code: str, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB
) -> SandboxResult:
    """Run code in a sandboxed `python -I` subprocess; see the module docstring for the limits."""
    cpu = max(1, int(timeout_s))
    bootstrap = _BOOTSTRAP.format(memory=int(memory_mb), cpu=cpu)
    with tempfile.TemporaryDirectory(prefix="qwenkit-sandbox-") as tmp:
        Path(tmp, "solution.py").write_text(code, "utf-8")
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-c", bootstrap],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so children die with it
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            return SandboxResult("timeout", None, _tail(err), _tail(out))
        finally:
            _kill_group(proc)  # whatever it left running
    stderr = _tail(err)
    code_ = proc.returncode
    if code_ == 0:
        return SandboxResult("passed", 0, stderr, _tail(out))
    if code_ in (-signal.SIGXCPU, -signal.SIGKILL) and "MemoryError" not in stderr:
        return SandboxResult("cpu", code_, stderr, _tail(out))
    if "MemoryError" in stderr:
        return SandboxResult("memory", code_, stderr, _tail(out))
    return SandboxResult("failed", code_, stderr, _tail(out))


def _tail(data: bytes) -> str:
    return data.decode("utf-8", "replace")[-TAIL:]
