"""A small pool of persistent worker processes whose calls a time limit really stops.

Contract: ProcessPool(size, preload).call(module, function, args, timeout_s) runs `module.function(*args)`
(JSON in, JSON out) in one of at most `size` worker processes and returns its result. Callers past `size`
wait for a free worker. A call that runs past timeout_s gets its worker killed (SIGKILL, reaped) and raises
WorkerTimeout; a fresh worker is started in its place. An exception inside the call raises WorkerError
with its type name and first line; a worker that dies raises WorkerCrashed. Workers are plain
`python -c` processes (no fork of the caller, no re-import of its __main__) given the caller's sys.path;
they import `preload` before their first call, exit when their stdin closes (so they end with their parent,
even a killed one), and are closed at interpreter exit. Thread-safe; after a fork the child starts its own.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Sequence
from typing import Any

__all__ = ["ProcessPool", "WorkerCrashed", "WorkerError", "WorkerTimeout"]

_BOOT = (
    "import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
    "from qwenkit.engines.process_pool import _worker_main; _worker_main(json.loads(sys.argv[2]))"
)


class WorkerTimeout(RuntimeError):
    """The call ran past its time limit; its worker was killed."""


class WorkerCrashed(RuntimeError):
    """The worker process died (or could not start) before answering."""


class WorkerError(RuntimeError):
    """The called function raised; kind is the exception's type name, the message its first line."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Worker:
    def __init__(self, preload: Sequence[str], start_timeout_s: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, json.dumps(sys.path), json.dumps(list(preload))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        self.start_timeout_s = start_timeout_s
        self.ready = False
        self.lines: queue.Queue[bytes] = queue.Queue()
        # A reader thread makes "wait for the answer, at most t seconds" portable; it ends at EOF.
        threading.Thread(target=self._read, daemon=True, name=f"pool-reader-{self.proc.pid}").start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for line in stdout:
                self.lines.put(line)
        self.lines.put(b"")  # EOF

    def _answer(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            self.kill()
            raise WorkerTimeout(f"the worker took over {timeout_s:g} s") from None
        if not line:
            code = self.kill()
            raise WorkerCrashed(f"the worker process exited (code {code})")
        return dict(json.loads(line))

    def call(self, module: str, function: str, args: Sequence[Any], timeout_s: float) -> Any:
        if not self.ready:
            self._answer(self.start_timeout_s)  # the "ready" line, after the preload imports
            self.ready = True
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps({"module": module, "function": function, "args": list(args)}).encode())
            stdin.write(b"\n")
        except OSError:
            code = self.kill()
            raise WorkerCrashed(f"the worker process exited (code {code})") from None
        answer = self._answer(timeout_s)
        if "error" in answer:
            raise WorkerError(answer["error"], answer["message"])
        return answer["result"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> int | None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        code = self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()  # type: ignore[union-attr]
        return code

    def close(self, grace_s: float) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(grace_s)
        self.kill()


class ProcessPool:
    """At most `size` worker processes, started on demand and kept for later calls (see the module)."""

    def __init__(self, size: int = 2, preload: Sequence[str] = (), start_timeout_s: float = 120.0) -> None:
        self.size = size
        self.preload = tuple(preload)
        self.start_timeout_s = start_timeout_s
        self._reset()
        _POOLS.add(self)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(self.size)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._closed = False

    def call(self, module: str, function: str, args: Sequence[Any], timeout_s: float) -> Any:
        """`module.function(*args)` in a worker; WorkerTimeout / WorkerError / WorkerCrashed otherwise."""
        if os.getpid() != self._pid:  # a forked child must not share its parent's pipes
            self._reset()
        with self._slots:
            with self._lock:
                if self._closed:
                    raise WorkerCrashed("the worker pool is closed")
                worker = self._idle.pop() if self._idle else None
                if worker is not None and not worker.alive():
                    worker.kill()  # reap it
                    worker = None
                if worker is None:
                    worker = self._start()
                self._busy.add(worker)
            healthy = False
            try:
                result = worker.call(module, function, args, timeout_s)
                healthy = True
                return result
            except WorkerError:
                healthy = True
                raise
            finally:
                with self._lock:
                    self._busy.discard(worker)
                    closed = self._closed
                    if healthy and not closed:
                        self._idle.append(worker)
                    elif not closed:
                        # Dead, or interrupted mid-call (its answer would reach the next caller): replace it
                        # now, so the next call finds a worker already starting.
                        with contextlib.suppress(WorkerCrashed):
                            self._idle.append(self._start())
                if not healthy or closed:
                    worker.kill()

    def _start(self) -> _Worker:
        try:
            return _Worker(self.preload, self.start_timeout_s)
        except OSError as exc:
            raise WorkerCrashed(f"could not start a worker process: {exc}") from None

    def pids(self) -> list[int]:
        """The process ids of the live workers (idle and busy)."""
        with self._lock:
            return [w.proc.pid for w in (*self._idle, *self._busy) if w.alive()]

    def close(self, grace_s: float = 1.0) -> None:
        """Stop every worker (idle ones get grace_s to exit on their own, then all are killed)."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            self._closed = True
            workers, self._idle = [*self._idle, *self._busy], []
        for worker in workers:
            worker.close(grace_s)


_POOLS: weakref.WeakSet[ProcessPool] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pool in list(_POOLS):
        pool.close(grace_s=0.2)


def _worker_main(preload: list[str]) -> None:
    """The worker side: answer one JSON line per JSON line read from stdin until stdin closes."""
    # Answers go to a private copy of stdout; anything else printed (Python or C) goes to stderr.
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the parent; stdin EOF ends us
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))  # schema converters recurse per level
    for name in preload:
        importlib.import_module(name)
    out.write(b'{"result": "ready"}\n')
    for line in sys.stdin.buffer:
        job = json.loads(line)
        try:
            fn = getattr(importlib.import_module(job["module"]), job["function"])
            answer: dict[str, Any] = {"result": fn(*job["args"])}
        except Exception as exc:
            message = (str(exc).splitlines() or [""])[0][:500]
            answer = {"error": type(exc).__name__, "message": message}
        out.write(json.dumps(answer).encode() + b"\n")
