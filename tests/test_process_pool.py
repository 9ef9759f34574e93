"""ProcessPool: calls run in worker processes; a time limit kills the worker, a crash is survived."""

from __future__ import annotations

import os
import threading

import pytest

from qwenkit.engines.process_pool import ProcessPool, WorkerCrashed, WorkerError, WorkerTimeout


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_calls_errors_timeouts_and_crashes() -> None:
    pool = ProcessPool(size=1)
    try:
        assert pool.call("math", "sqrt", [9.0], timeout_s=60) == 3.0
        [pid] = pool.pids()
        assert pool.call("os", "getpid", [], timeout_s=60) == pid  # the same worker is kept
        with pytest.raises(WorkerError, match="math domain error") as err:
            pool.call("math", "sqrt", [-1.0], timeout_s=60)
        assert err.value.kind == "ValueError" and pool.pids() == [pid]  # an exception keeps the worker
        with pytest.raises(WorkerTimeout):
            pool.call("time", "sleep", [3600], timeout_s=0.5)
        assert gone(pid)  # killed and reaped
        [replacement] = pool.pids()  # started at once
        assert replacement != pid and pool.call("os", "getpid", [], timeout_s=60) == replacement
        with pytest.raises(WorkerCrashed, match="code 7"):
            pool.call("os", "_exit", [7], timeout_s=60)
        assert gone(replacement) and pool.call("math", "sqrt", [4.0], timeout_s=60) == 2.0
    finally:
        pool.close()
    assert pool.pids() == []
    with pytest.raises(WorkerCrashed, match="closed"):
        pool.call("math", "sqrt", [1.0], timeout_s=60)


def test_concurrency_is_bounded_and_close_stops_every_worker() -> None:
    pool = ProcessPool(size=2)
    pids: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        pid = pool.call("os", "getpid", [], timeout_s=60)
        with lock:
            pids.append(pid)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live = pool.pids()
    assert len(pids) == 6 and 1 <= len(set(pids)) <= 2 and set(pids) == set(live)
    pool.close()
    assert all(gone(pid) for pid in live)
