"""Worker polling and thread counts (issue 12): the ggml thread pool made, attached and freed with the
context, the same greedy output at every level, EngineConfig.poll validation, the "auto" chooser on fake
/proc readings, libgomp's settings for OpenMP builds, the thread governor (fake readings, then a real engine
whose llama.cpp context it re-threads), and --threads/--poll on the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from qwenkit.cli import common as cli_common
from qwenkit.cli.app import app
from qwenkit.engines.llamacpp import threads
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.model import LlamaModel
from qwenkit.hardware import physical_cores

PROC_STAT = """cpu  {user} 0 {system} {idle} 0 0 0 0 0 0
cpu0 1 0 1 1 0 0 0 0 0 0
cpu1 1 0 1 1 0 0 0 0 0 0
intr 12345
ctxt 999
"""
SELF_STAT = "4242 (python (x) y) S 1 4242 4242 0 -1 4194304 100 0 0 0 {utime} {stime} 0 0 20 0 3 0 1 1 1"


def sample(user: int, system: int, idle: int, own: int, cpus: int = 2) -> threads.CpuSample:
    stat = PROC_STAT.format(user=user, system=system, idle=idle)
    stat += "".join(f"cpu{i} 1 0 1 1 0 0 0 0 0 0\n" for i in range(2, cpus))
    return threads.CpuSample.parse(stat, SELF_STAT.format(utime=own, stime=0))


@pytest.fixture(scope="module")
def gguf(demo_gguf: Callable[..., Path]) -> Path:
    return demo_gguf("qwen3", "tiny", "f32")


def greedy(model: LlamaModel, n: int = 12) -> tuple[list[int], np.ndarray]:
    """n greedy tokens after a fixed prompt, and every step's logits."""
    prompt = [1000 + (i * 7919) % 50000 for i in range(10)]
    out: list[int] = []
    logits = []
    model.decode(prompt, list(range(10)), [0] * 10, [False] * 9 + [True])
    index = 9
    for step in range(n):
        logits.append(model.logits(index).copy())
        out.append(int(np.argmax(logits[-1])))
        assert model.decode([out[-1]], [10 + step], [0], [True]) == 0
        index = 0
    return out, np.stack(logits)


def test_the_pool_is_attached_with_the_context_and_freed_on_close(gguf: Path) -> None:
    before = threads.live_pools()
    for poll in (0, 50, 0, 100):
        model = LlamaModel(gguf, EngineConfig(n_ctx=256, max_seqs=1, threads=2, poll=poll))
        assert model.poll == poll
        assert model._pool is not None and model._pool.poll == poll and model._pool.handle
        assert threads.live_pools() == before + 1
        model.close()
        model.close()  # twice: still one free
        assert threads.live_pools() == before


def test_greedy_output_is_the_same_with_polling_off_and_default(gguf: Path) -> None:
    outs = []
    for poll in (50, 0):
        model = LlamaModel(gguf, EngineConfig(n_ctx=256, max_seqs=1, threads=2, poll=poll))
        try:
            outs.append(greedy(model))
        finally:
            model.close()
    assert outs[0][0] == outs[1][0]
    assert np.array_equal(outs[0][1], outs[1][1]) and np.ptp(outs[0][1]) > 0


def test_a_pool_runs_decode_with_its_own_thread_count(gguf: Path) -> None:
    # One worker: the context's decode still works (a pool the context did not make).
    model = LlamaModel(gguf, EngineConfig(n_ctx=256, max_seqs=1, threads=1, poll=0))
    try:
        assert model._pool is not None and model._pool.n_threads == 1
        assert len(greedy(model, 4)[0]) == 4
    finally:
        model.close()


@pytest.mark.parametrize("bad", [101, -1, True, "fast", 2.5])
def test_config_rejects_a_bad_poll(bad: object) -> None:
    with pytest.raises(ValidationError, match="poll"):
        EngineConfig(poll=bad)  # type: ignore[arg-type]


def test_config_poll_levels_and_auto() -> None:
    assert EngineConfig().poll == threads.DEFAULT_POLL == 50
    assert EngineConfig(poll=0).poll == 0 and EngineConfig(poll=100).poll == 100
    assert EngineConfig(poll="auto").poll == "auto"
    with pytest.raises(ValueError, match=r"0\.\.100"):
        threads.ThreadPool(1, 101)


def test_cpu_sample_parses_proc_stat_and_own_ticks() -> None:
    s = sample(user=100, system=50, idle=1000, own=7, cpus=4)
    assert (s.busy, s.total, s.own, s.n_cpus) == (150, 1150, 7, 4)


@pytest.mark.parametrize(
    ("busy_ticks", "own_ticks", "cpus", "threads_", "level"),
    [
        (0, 0, 2, 2, 50),  # quiet
        (60, 0, 2, 2, 0),  # others keep 0.6 of 2 cores busy while our 2 threads want both
        (90, 80, 2, 2, 50),  # the busy time is our own (loading the model)
        (300, 0, 16, 4, 50),  # 3 cores of other load, 12 left free: no contention
        (1300, 0, 16, 4, 0),  # 13 cores of other load on 16 with 4 threads
        (20, 0, 2, 1, 50),  # 0.2 core of other load with one core free
    ],
)
def test_auto_chooses_polling_off_only_under_other_load(
    busy_ticks: int, own_ticks: int, cpus: int, threads_: int, level: int
) -> None:
    before = sample(user=1000, system=0, idle=1000, own=50, cpus=cpus)
    # 100 ticks of wall time per CPU between the samples
    after = sample(
        user=1000 + busy_ticks, system=0, idle=1000 + 100 * cpus - busy_ticks, own=50 + own_ticks, cpus=cpus
    )
    chosen, why = threads.choose_poll(before, after, threads_)
    assert chosen == level
    assert f"{threads.other_load(before, after):.2f} of {cpus} cores" in why
    assert ("polling off" in why) == (level == 0)


def test_resolve_poll_measures_only_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    assert threads.resolve_poll(30, 2) == (30, "polling 30 (as configured)")
    readings = iter([sample(1000, 0, 1000, 0), sample(1150, 0, 1050, 0)])  # 1.5 of 2 cores: others
    monkeypatch.setattr(threads.CpuSample, "read", classmethod(lambda cls: next(readings)))
    level, why = threads.resolve_poll("auto", 2, seconds=0)
    assert level == 0 and "1.50 of 2 cores" in why

    def no_proc(cls: type) -> threads.CpuSample:
        raise OSError("no /proc")

    monkeypatch.setattr(threads.CpuSample, "read", classmethod(no_proc))
    assert threads.resolve_poll("auto", 2, seconds=0)[0] == threads.DEFAULT_POLL


def test_openmp_settings_follow_the_level(monkeypatch: pytest.MonkeyPatch) -> None:
    assert threads.openmp_env(0) == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    assert threads.openmp_env(50) == {"GOMP_SPINCOUNT": "300000"}  # libgomp's own default
    # A private copy of the environment: prepare_openmp must not leave PASSIVE to later tests' servers.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    monkeypatch.setattr(os, "environ", env)
    maps = "7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0\n7f02-7f03 rw-p 0 0 0\n"
    assert threads._libgomp_loaded(maps) and not threads._libgomp_loaded("7f-7f r-xp 0 0 1 /lib/libc.so.6\n")
    # Loaded already (this session): only the default level is what it runs with.
    assert threads.prepare_openmp(50) and not threads.prepare_openmp(0)
    monkeypatch.setattr(threads, "_libgomp_loaded", lambda maps=None: False)
    assert threads.prepare_openmp(0)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["GOMP_SPINCOUNT"] == "0"


def test_this_build_binds_the_pool_functions() -> None:
    pool = threads.ThreadPool(2, 0)
    try:
        assert pool.handle and pool.n_threads == 2
    finally:
        pool.free()
        pool.free()
    assert pool.handle is None
    assert isinstance(threads.uses_openmp(), bool)


runner = CliRunner()


@pytest.mark.parametrize("command", [("serve", "--port", "0"), ("generate", "hi"), ("chat",)])
@pytest.mark.parametrize("bad", ["fast", "101", "-3"])
def test_cli_rejects_a_bad_poll(command: tuple[str, ...], bad: str) -> None:
    result = runner.invoke(app, [*command, "--poll", bad, "--threads", "1"])
    assert result.exit_code == 2
    assert "--poll must be 'auto' or a level 0-100" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("flags", "poll", "count", "adapt"),
    [
        (["--poll", "0", "--threads", "1"], 0, 1, False),
        (["--threads", "1"], None, 1, False),  # --threads N: auto measured at start
        ([], threads.DEFAULT_POLL, None, True),  # the default: threads follow the load, llama.cpp's polling
        (["--poll", "0"], 0, None, True),
    ],
)
def test_cli_threads_and_poll_reach_the_engine(
    monkeypatch: pytest.MonkeyPatch, flags: list[str], poll: int | None, count: int | None, adapt: bool
) -> None:
    configs: list[EngineConfig] = []
    real_config = EngineConfig

    def config(**kw: object) -> EngineConfig:
        configs.append(real_config(**kw))  # type: ignore[arg-type]
        return configs[-1]

    monkeypatch.setattr("qwenkit.cli.run.EngineConfig", config)
    result = runner.invoke(app, ["generate", "Hello", "-n", "2", "--no-think", *flags])
    assert result.exit_code == 0, result.stderr
    got = configs[-1]
    assert got.adapt_threads is adapt and got.threads == (count or physical_cores())
    assert got.poll in ((0, 50) if poll is None else (poll,))


def test_engine_threads_auto_says_its_choice(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_common.engine_threads(2, " 7 ") == cli_common.EngineThreads(2, 7, False)
    assert capsys.readouterr().err == ""  # an explicit level is not announced
    monkeypatch.setattr(threads, "resolve_poll", lambda poll, n: (0, "others keep 1.9 of 2 cores busy"))
    assert cli_common.engine_threads(2, "AUTO").poll == 0
    assert "--poll auto: others keep 1.9 of 2 cores busy" in capsys.readouterr().err
    # No --threads: the governor handles load, so auto is llama.cpp's default without a sample.
    adaptive = cli_common.engine_threads(None, "auto")
    assert adaptive == cli_common.EngineThreads(physical_cores(), threads.DEFAULT_POLL, True)
    assert capsys.readouterr().err == ""
    assert adaptive.config() == {"threads": physical_cores(), "poll": 50, "adapt_threads": True}


@pytest.mark.parametrize(
    ("load", "current", "most", "cpus", "wanted"),
    [
        (0.0, 2, 2, 2, 2),  # quiet
        (0.3, 2, 2, 2, 2),  # a light load: two threads still pay (break-even measured at half a core)
        (0.9, 2, 2, 2, 1),  # one busy core of two
        (1.9, 2, 2, 2, 1),  # both: never below 1
        (1.5, 1, 2, 2, 1),  # the load that made us drop, now on the core we left
        (0.1, 1, 2, 2, 2),  # it stopped: back up
        (0.4, 1, 2, 2, 1),  # hysteresis: not back while it is near the break-even
        (6.0, 8, 8, 16, 8),  # 6 busy of the 8 cores left free: no contention
        (11.0, 8, 8, 16, 5),  # 11 of 16: make room for them at once
        (5.0, 5, 8, 16, 6),  # eased: one more at a time
    ],
)
def test_choose_threads(load: float, current: int, most: int, cpus: int, wanted: int) -> None:
    assert threads.choose_threads(load, current, most, cpus) == wanted


class FakeProc:
    """CPU readings of two cores where other processes take `others` cores from one tick() to the next."""

    def __init__(self) -> None:
        self.now = 0.0
        self.busy = self.total = 0
        self.others = 0.0

    def advance(self, seconds: float, others: float) -> None:
        self.now += seconds
        self.total += int(200 * seconds)  # 100 ticks a second on each of 2 cores
        self.busy += int(100 * seconds * others)

    def read(self) -> threads.CpuSample:
        return threads.CpuSample(busy=self.busy, total=self.total, own=0, n_cpus=2)


def test_the_governor_drops_a_thread_under_load_and_restores_it_after_two_quiet_samples() -> None:
    proc = FakeProc()
    gov = threads.ThreadGovernor(2, interval=0.5, read=proc.read, clock=lambda: proc.now)
    seen = []
    for others in [0.0, 0.0, 1.6, 1.6, 1.6, 0.0, 0.0, 0.0, 1.0]:
        proc.advance(0.2, others)
        seen.append(gov.tick())  # between samples: nothing
        proc.advance(0.4, others)
        seen.append(gov.tick())
    assert seen[0] is None and seen[1] is None  # quiet
    assert seen[5] == (1, "other processes keep 1.60 of 2 cores busy: decoding on 1 of 2 threads")
    assert [c for c in seen[6:] if c] == [
        (2, "other processes keep 0.00 of 2 cores busy: decoding on 2 of 2 threads"),
        (1, "other processes keep 1.00 of 2 cores busy: decoding on 1 of 2 threads"),
    ]
    assert seen[13] is not None and seen[11] is None  # back up only on the second quiet sample
    assert gov.current == 1


def test_the_governor_without_proc_keeps_the_configured_threads() -> None:
    def no_proc() -> threads.CpuSample:
        raise OSError("no /proc")

    clock = iter(range(100))
    gov = threads.ThreadGovernor(4, read=no_proc, clock=lambda: float(next(clock)))
    assert [gov.tick() for _ in range(5)] == [None] * 5 and gov.current == 4


def test_the_engine_rethreads_its_context_under_load(gguf: Path) -> None:
    from qwenkit.engines.llamacpp.engine import LlamaCppEngine
    from qwenkit.engines.request import GenerationRequest
    from qwenkit.engines.sampling import SamplingParams
    from qwenkit.serve.metrics import ServeMetrics

    engine = LlamaCppEngine(gguf, EngineConfig(n_ctx=256, max_seqs=1, threads=2, adapt_threads=True))
    try:
        assert engine.governor is not None and engine.stats().threads == 2
        proc = FakeProc()
        engine.governor = threads.ThreadGovernor(2, read=proc.read, clock=lambda: proc.now)
        n_threads = []

        def run(others: float) -> None:
            proc.advance(0.6, others)
            request = GenerationRequest(f"r{others}", (1000, 1001, 1002), SamplingParams(max_tokens=3))
            assert [e for e in engine.generate_sync(request)][-1].finish_reason == "length"
            n_threads.append((engine.stats().threads, llama_cpp.llama_n_threads(engine.model._ctx)))

        for others in (0.0, 1.8, 1.8, 0.0, 0.0):
            run(others)
        assert n_threads == [(2, 2), (1, 1), (1, 1), (1, 1), (2, 2)]
        run(1.8)
        assert b"qwenkit_engine_threads 1.0" in ServeMetrics(engine).render()
    finally:
        engine.close()


def test_a_fixed_thread_count_has_no_governor(gguf: Path) -> None:
    from qwenkit.engines.llamacpp.engine import LlamaCppEngine

    engine = LlamaCppEngine(gguf, EngineConfig(n_ctx=256, max_seqs=1, threads=2))
    try:
        assert engine.governor is None and engine.stats().threads == 2
    finally:
        engine.close()


def test_serve_help_lists_poll() -> None:
    result = runner.invoke(app, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "--poll" in result.output


SHOW_OPENMP = """
import sys
from qwenkit.cli.common import engine_threads
engine_threads(1, sys.argv[1])
import llama_cpp.llama_cpp as native
native._lib.omp_display_env(1)
"""


@pytest.mark.parametrize(("poll", "policy", "spins"), [("0", "PASSIVE", "0"), ("50", None, "300000")])
def test_the_cli_level_reaches_an_openmp_build(poll: str, policy: str | None, spins: str) -> None:
    # What libgomp itself reports when the CLI set the level before llama.cpp loaded.
    if not threads.uses_openmp():
        pytest.skip("this llama.cpp build does not use OpenMP")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run(
        [sys.executable, "-c", SHOW_OPENMP, poll], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shown = done.stdout + done.stderr
    assert f"GOMP_SPINCOUNT = '{spins}'" in shown
    if policy:
        assert f"OMP_WAIT_POLICY = '{policy}'" in shown
