"""Benchmark children die with the benchmark (benchmarks/children.py): a parent python starts `sleep` through
start(), the parent is killed (SIGKILL, SIGTERM or SIGINT), and the sleep must be gone within seconds.
Without PR_SET_PDEATHSIG the sleep, in its own session, outlives a SIGKILLed parent by a minute."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PARENT = f"""
import sys, time
sys.path.insert(0, {str(BENCHMARKS)!r})
from children import start, stop
child = start(["sleep", "60"])
print(child.pid, flush=True)
try:
    time.sleep(60)
finally:
    stop(child)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")


def _running(pid: int) -> bool:
    """Whether pid is a live process (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_child_dies_with_its_parent(sig: signal.Signals) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _running(child) and os.getpgid(child) != os.getpgid(parent.pid)  # own session
        parent.send_signal(sig)
        parent.wait(timeout=15)
        assert _gone_within(child, 5), f"sleep {child} outlived its parent ({sig.name})"
        if sig == signal.SIGTERM:  # the handler stopped the child and exited as SIGTERM would
            assert parent.returncode == 128 + signal.SIGTERM
    finally:
        parent.kill()
        parent.wait()
        if child and _running(child):
            os.kill(child, signal.SIGKILL)
