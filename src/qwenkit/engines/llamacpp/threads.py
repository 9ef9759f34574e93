"""How llama.cpp's worker threads wait for work: a ggml thread pool with a polling level, and "auto".

Contract: ThreadPool(n_threads, poll) is a native ggml thread pool (ctypes: llama-cpp-python does not bind
it) that LlamaModel attaches to its context and frees with it; poll 0..100 is llama.cpp's `--poll` level
(0: sleep at once, 50: llama.cpp's default, 100: spin longest). Wheels built with OpenMP (the PyPI sdist
default) ignore the pool's level: their workers wait the way libgomp was told when it loaded, so
prepare_openmp() sets OMP_WAIT_POLICY / GOMP_SPINCOUNT for the level before llama.cpp loads (poll 50 is
libgomp's own default of 300,000 spins); after that it can only report that it is too late.
resolve_poll("auto") samples /proc/stat for ~0.3 s: when other processes keep busy more than the cores our
threads leave free plus a quarter core, it picks 0 (spinning workers starve each other: 0.4 vs 60 tok/s
measured), else llama.cpp's default. In a container /proc/stat counts the host's CPUs and their load.
ThreadGovernor follows other load while the engine runs: tick() re-samples /proc every `interval` seconds
and returns a new decode thread count when it should change (choose_threads: fewer threads while others
keep the cores our threads need busy, down to 1, whose decode has no barrier to wait at for a descheduled
worker; one more after two quiet samples, up to the configured count).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DEFAULT_POLL = 50  # llama.cpp's --poll default (common.h) and ggml_threadpool_params_init's
AUTO_SLACK_CORES = 0.25  # other load beyond the cores our threads leave free that turns polling off
# ThreadGovernor: other load beyond the free cores that drops a thread, and that still allows one more. At
# 2 threads on 2 cores, a load of half a core was the break-even measured (52 vs 55 tok/s on one thread).
DROP_SLACK_CORES = 0.5
ADD_SLACK_CORES = 0.25
SAMPLE_SECONDS = 0.3
_MAX_THREADS = 512  # GGML_MAX_N_THREADS: the size of the cpumask array at the head of the params struct
# libgomp's spin count that matches the default level: 6,000 spins per poll step (~3 ms at 50).
_SPINS_PER_LEVEL = 6000

log = logging.getLogger("qwenkit.engine")

Poll = int | Literal["auto"]


class _PoolParams(ctypes.Structure):
    # struct ggml_threadpool_params (ggml.h); filled by ggml_threadpool_params_init, then checked.
    _fields_ = [
        ("cpumask", ctypes.c_bool * _MAX_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


def _lib() -> ctypes.CDLL:
    import llama_cpp.llama_cpp as native  # libllama; dlsym on it also finds ggml-cpu's symbols

    lib = native._lib
    if not getattr(lib, "_qwenkit_threadpool_bound", False):
        if not all(hasattr(lib, f) for f in ("ggml_threadpool_new", "llama_attach_threadpool")):
            raise RuntimeError("this llama.cpp build has no ggml thread pool functions")
        lib.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(_PoolParams), ctypes.c_int]
        lib.ggml_threadpool_params_init.restype = None
        lib.ggml_threadpool_new.argtypes = [ctypes.POINTER(_PoolParams)]
        lib.ggml_threadpool_new.restype = ctypes.c_void_p
        lib.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
        lib.ggml_threadpool_free.restype = None
        lib.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.llama_attach_threadpool.restype = None
        lib._qwenkit_threadpool_bound = True
    return lib


_live = 0  # pools created and not yet freed (tests check that close() frees them)


def live_pools() -> int:
    return _live


class ThreadPool:
    """A ggml thread pool of n_threads workers waiting at this polling level; free() once."""

    def __init__(self, n_threads: int, poll: int) -> None:
        global _live
        if not 0 <= poll <= 100:
            raise ValueError(f"poll must be 0..100 (got {poll})")
        lib = _lib()
        params = _PoolParams()
        lib.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
        if params.n_threads != n_threads or params.poll != DEFAULT_POLL:  # the layout is not ours: stop
            raise RuntimeError("ggml_threadpool_params has an unknown layout in this llama.cpp build")
        params.poll = poll
        handle = lib.ggml_threadpool_new(ctypes.byref(params))
        if not handle:
            raise RuntimeError(f"ggml could not create a thread pool of {n_threads} threads")
        self.handle: int | None = handle
        self.n_threads = n_threads
        self.poll = poll
        _live += 1

    def attach(self, ctx: object) -> None:
        """Make this pool run the context's decode calls (prompt batches too)."""
        _lib().llama_attach_threadpool(ctx, self.handle, None)

    def free(self) -> None:
        global _live
        if self.handle is not None:
            _lib().ggml_threadpool_free(self.handle)
            self.handle = None
            _live -= 1


def uses_openmp() -> bool:
    """True when this llama.cpp build runs its workers with OpenMP (the pool's polling level then unused)."""
    import llama_cpp.llama_cpp as native

    return hasattr(native._lib, "GOMP_parallel")


def openmp_env(poll: int) -> dict[str, str]:
    """libgomp's settings for a polling level: 0 sleeps at once (PASSIVE); n spins n × 6,000 times."""
    if poll == 0:
        return {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    return {"GOMP_SPINCOUNT": str(poll * _SPINS_PER_LEVEL)}


def _libgomp_loaded(maps: str | None = None) -> bool:
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return True  # cannot tell: assume it is, so nothing claims an effect it may not have
    return any(
        Path(line.split()[-1]).name.startswith("libgomp.so") for line in maps.splitlines() if "/" in line
    )


def prepare_openmp(poll: int) -> bool:
    """Set libgomp's wait settings for this level if libgomp has not loaded yet; True when they govern it
    (set now, or already in the environment it loaded with)."""
    wanted = openmp_env(poll)
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return True
    if _libgomp_loaded():
        # Loaded with no settings of ours: libgomp's default, which is the default level.
        return poll == DEFAULT_POLL and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys()
    os.environ.update(wanted)
    return True


@dataclass(frozen=True)
class CpuSample:
    """Cumulative clock ticks from /proc: all CPUs busy and in total, this process's own, and the CPUs."""

    busy: int
    total: int
    own: int
    n_cpus: int

    @classmethod
    def parse(cls, proc_stat: str, self_stat: str) -> CpuSample:
        busy = total = n_cpus = 0
        for line in proc_stat.splitlines():
            fields = line.split()
            if fields and fields[0] == "cpu":
                # user nice system idle iowait irq softirq steal (guest time is already in user)
                ticks = [int(x) for x in fields[1:9]]
                total = sum(ticks)
                busy = total - ticks[3] - ticks[4]
            elif fields and fields[0].startswith("cpu"):
                n_cpus += 1
        after_name = self_stat.rsplit(")", 1)[-1].split()  # the name in (...) may hold spaces
        own = int(after_name[11]) + int(after_name[12])  # utime, stime: fields 14 and 15
        return cls(busy=busy, total=total, own=own, n_cpus=max(1, n_cpus))

    @classmethod
    def read(cls) -> CpuSample:
        return cls.parse(Path("/proc/stat").read_text(), Path("/proc/self/stat").read_text())


def other_load(before: CpuSample, after: CpuSample) -> float:
    """Cores kept busy by other processes between two samples."""
    total = after.total - before.total
    if total <= 0:
        return 0.0
    others = (after.busy - before.busy) - (after.own - before.own)
    return max(0.0, others / total * after.n_cpus)


def choose_poll(before: CpuSample, after: CpuSample, threads: int) -> tuple[int, str]:
    """The polling level for this much other load, and why (one line for the log)."""
    load = other_load(before, after)
    free = max(0, after.n_cpus - threads)
    level = 0 if load > free + AUTO_SLACK_CORES else DEFAULT_POLL
    busy = f"other processes keep {load:.2f} of {after.n_cpus} cores busy"
    return level, f"{busy}: polling {'off' if level == 0 else level}"


def resolve_poll(poll: Poll, threads: int, seconds: float = SAMPLE_SECONDS) -> tuple[int, str]:
    """The level to use and why: an explicit level as is; "auto" measured now (without /proc: llama.cpp's
    default). An "auto" choice is logged."""
    if poll != "auto":
        return poll, f"polling {poll} (as configured)"
    try:
        before = CpuSample.read()
        time.sleep(seconds)
        level, why = choose_poll(before, CpuSample.read(), threads)
    except (OSError, ValueError, IndexError):
        level, why = DEFAULT_POLL, f"no /proc/stat to measure other load: polling {DEFAULT_POLL}"
    log.info("poll auto: %s", why)
    return level, why


def choose_threads(load: float, current: int, most: int, n_cpus: int) -> int:
    """The decode thread count for this much other load (cores), from `current`, within 1..most."""
    if load > n_cpus - current + DROP_SLACK_CORES:  # others want cores our threads hold: make room
        return max(1, min(current - 1, n_cpus - math.ceil(load - DROP_SLACK_CORES)))
    if current < most and load <= n_cpus - current - 1 + ADD_SLACK_CORES:  # a core stays free for one more
        return current + 1
    return current


@dataclass
class ThreadGovernor:
    """Decode threads that make room for other processes' load (see the module docstring)."""

    most: int
    interval: float = 0.5
    read: Callable[[], CpuSample] = CpuSample.read
    clock: Callable[[], float] = time.monotonic
    current: int = field(init=False)
    _last: CpuSample | None = field(default=None, init=False)
    _last_at: float = field(default=0.0, init=False)
    _quiet: int = field(default=0, init=False)  # samples in a row that would allow one more thread

    def __post_init__(self) -> None:
        self.current = self.most
        self._last = self._read()  # so the first step after `interval` can already decide
        self._last_at = self.clock()

    def _read(self) -> CpuSample | None:
        try:
            return self.read()
        except (OSError, ValueError, IndexError):  # no /proc (not Linux): the count stays as configured
            return None

    def tick(self) -> tuple[int, str] | None:
        """(new thread count, why) when it should change now; None otherwise (and between samples)."""
        now = self.clock()
        if now - self._last_at < self.interval:
            return None
        before, sample = self._last, self._read()
        self._last, self._last_at = sample, now
        if before is None or sample is None:
            return None
        load = other_load(before, sample)
        wanted = choose_threads(load, self.current, self.most, sample.n_cpus)
        self._quiet = self._quiet + 1 if wanted > self.current else 0
        if wanted == self.current or (wanted > self.current and self._quiet < 2):
            return None
        self.current, self._quiet = wanted, 0
        busy = f"other processes keep {load:.2f} of {sample.n_cpus} cores busy"
        return wanted, f"{busy}: decoding on {wanted} of {self.most} threads"
