"""The benchmarks' child processes (servers, load generators), which die with the benchmark.

A benchmark killed mid-run (SIGTERM, SIGINT or SIGKILL) must not leave llama-server, `qwenkit serve` or a
busy loop running: it would skew every later measurement. start() runs a child in its own session (so a
terminal's Ctrl-C reaches only the benchmark, whose `finally:` stops its children in order) and, on Linux,
has the kernel send the child SIGTERM when the benchmark dies, however it dies (prctl PR_SET_PDEATHSIG).
The first start() on the main thread also installs a SIGTERM handler (unless one is set already) that
stops every child still running and exits with status 143, so `finally:` blocks run as on Ctrl-C.
stop() ends children: SIGTERM, then SIGKILL after `timeout` seconds.
PR_SET_PDEATHSIG fires when the *thread* that started the child ends: call start() from the main thread.
Standard library only, so tests can import it without the benchmarks' dependencies.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from types import FrameType

__all__ = ["start", "stop"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_live: list[subprocess.Popen[bytes]] = []  # started here and not yet stopped


def _load_prctl() -> Callable[..., int] | None:
    # Resolved once in the parent: the child, between fork and exec, should only make the call.
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]


_prctl = _load_prctl()


def _die_with(parent: int) -> None:
    """preexec_fn (runs in the child before exec): SIGTERM when `parent` dies."""
    assert _prctl is not None
    if _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before prctl: no signal will come
        os._exit(128 + signal.SIGTERM)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    stop(*_live, timeout=10)
    raise SystemExit(128 + signum)


def _install_sigterm_handler() -> None:
    on_main = threading.current_thread() is threading.main_thread()
    if on_main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def start(
    cmd: list[str], env: Mapping[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """cmd as a child that dies with this process; its output is appended to log, or dropped."""
    _install_sigterm_handler()
    preexec = None if _prctl is None else partial(_die_with, os.getpid())
    with log.open("ab") if log is not None else contextlib.nullcontext(subprocess.DEVNULL) as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=preexec,  # one libc call, resolved beforehand: safe enough beside threads
        )
    _live.append(proc)
    return proc


def stop(*procs: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM to each child, then SIGKILL to those still running after `timeout` seconds; all reaped."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ValueError):
            _live.remove(proc)
