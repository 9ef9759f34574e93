"""Health with advice: GET /health (and ?verbose=1), read by the web console and `qwenkit doctor --server`.

Contract: `advise(observed, facts)` is a pure function from measured values (Observed) and the server's
settings (Facts) to Checks: a name, a status (ok, warn, fail, unknown), the measured value and, when not
ok, a recommendation that names the exact flag or command. HealthMonitor samples the server's Prometheus
counters and the engine at each verbose call and measures over the samples of the last WINDOW_S seconds
(since the start while it has one); the planner's decode estimate for the served GGUF on this machine is
worked out once, in a worker thread. With API keys set, the verbose report needs a key: it describes the
machine. The plain /health stays public and small.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from qwenkit import hardware
from qwenkit.engines.base import Engine
from qwenkit.serve.errors import APIError
from qwenkit.serve.metrics import ServeMetrics

Status = Literal["ok", "warn", "fail", "unknown"]
_RANK: dict[Status, int] = {"ok": 0, "unknown": 1, "warn": 2, "fail": 3}
WINDOW_S = 60.0
SLOW_RATIO = 0.5  # decode below half the planner's estimate: something else is wrong
# Above this, a bandwidth estimate says little: a step's fixed costs (sampling, scheduling) dominate.
BOUND_TOK_S = 100.0
MEMORY_WARN, MEMORY_FAIL = 0.15, 0.05  # fraction of memory still available
QUEUE_TTFT_S = 2.0  # mean time to first token that counts as queueing
KV_WARN = 0.9
TRUNCATION_WARN, TRUNCATION_MIN = 0.2, 5  # share of answers cut by max_tokens, out of at least this many


@dataclass(frozen=True)
class Facts:
    """The server's settings and this machine's, as the advice needs them."""

    model: str = "MODEL"
    threads: int | None = None
    physical_cores: int | None = None
    max_seqs: int | None = None
    n_ctx: int | None = None
    state_cache_mb: int | None = None


@dataclass(frozen=True)
class Observed:
    """What was measured over `window_s` seconds (counters as differences), plus gauges read now."""

    window_s: float = 0.0
    decode_tok_s: float | None = None  # per sequence: 1 / mean inter-token latency
    expected_tok_s: float | None = None  # the planner's per-sequence estimate at the observed batch
    expected_basis: str = ""
    batch: float | None = None  # mean sequences per engine step
    throughput_tok_s: float | None = None  # all sequences together
    running: int = 0
    waiting: int = 0
    ttft_mean_s: float | None = None
    kv_used: int = 0
    kv_total: int = 0
    preemptions: int = 0
    state_cache_bytes: int = 0
    state_cache_evictions: int = 0
    memory_total: int | None = None
    memory_available: int | None = None
    process_rss: int | None = None
    swap_used: int | None = None
    load_avg: float | None = None
    cpus: int | None = None
    finished: int = 0
    truncated: int = 0  # finish_reason "length": the answer (often still thinking) hit max_tokens


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    value: str
    detail: str = ""
    advice: str = ""


def _mib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


def _now(x: int | None, what: str) -> str:
    return f" (now {x})" if x is not None else f" (now {what})"


def _decode_check(o: Observed, f: Facts) -> Check:
    if o.decode_tok_s is None:
        return Check("decode speed", "unknown", "no tokens decoded yet", "send a request to measure it")
    value = f"{o.decode_tok_s:.1f} tok/s per sequence"
    if o.batch:
        value += f" at {o.batch:.1f} sequences per step"
    if o.expected_tok_s is None:
        return Check("decode speed", "unknown", value, "no planner estimate for this engine or machine")
    ratio = o.decode_tok_s / o.expected_tok_s
    detail = f"{ratio:.0%} of the planner's {o.expected_tok_s:.1f} tok/s ({o.expected_basis})"
    if o.expected_tok_s > BOUND_TOK_S:
        return Check("decode speed", "unknown", value, detail + "; too small a model to judge by bandwidth")
    if ratio >= SLOW_RATIO:
        return Check("decode speed", "ok", value, detail)
    if f.threads is not None and f.physical_cores is not None and f.threads != f.physical_cores:
        more = "fewer threads than" if f.threads < f.physical_cores else "more threads than"
        advice = (
            f"likely cause: threads — {f.threads} threads, {more} the {f.physical_cores} physical cores; "
            f"restart with --threads {f.physical_cores}"
        )
    elif (
        o.swap_used
        and o.memory_available is not None
        and o.memory_total
        and (o.memory_available / o.memory_total < MEMORY_WARN)
    ):
        advice = (
            f"likely cause: swap — {_mib(o.swap_used)} swapped and little memory free; "
            f"serve a smaller model or context (`qwenkit plan {f.model} --concurrency {f.max_seqs or 1}`)"
        )
    elif o.load_avg is not None and o.cpus and o.load_avg > o.cpus + 0.5:
        advice = (
            f"likely cause: another process — load {o.load_avg:.1f} on {o.cpus} CPUs; stop it (see `top`) "
            f"or give the server its own cores (`taskset -c 0-{o.cpus - 1} qwenkit serve ...`)"
        )
    else:
        advice = (
            "cause unclear (threads, load and swap look fine): compare with `qwenkit bench` "
            "and check the CPU frequency governor"
        )
    return Check("decode speed", "warn", value, detail, advice)


def _memory_check(o: Observed, f: Facts) -> Check:
    if not o.memory_total or o.memory_available is None:
        return Check("memory", "unknown", "cannot read this machine's memory")
    share = o.memory_available / o.memory_total
    value = f"{_mib(o.memory_available)} of {_mib(o.memory_total)} available ({share:.0%})"
    detail = f"this server holds {_mib(o.process_rss)}" if o.process_rss else ""
    if share >= MEMORY_WARN:
        return Check("memory", "ok", value, detail)
    per_seq = f.n_ctx // f.max_seqs if f.n_ctx and f.max_seqs else None
    ctx = f" --ctx {per_seq}" if per_seq else ""
    advice = (
        f"little headroom: `qwenkit plan {f.model} --concurrency {f.max_seqs or 1}{ctx}` names a smaller "
        f"quant (--quant) or context (--ctx) that fits; restart with it, or lower --max-seqs"
    )
    return Check("memory", "fail" if share < MEMORY_FAIL else "warn", value, detail, advice)


def _queue_check(o: Observed, f: Facts) -> Check:
    ttft = f", mean time to first token {o.ttft_mean_s:.2f} s" if o.ttft_mean_s is not None else ""
    value = f"{o.running} running, {o.waiting} waiting{ttft}"
    slow_start = o.ttft_mean_s is not None and o.ttft_mean_s > QUEUE_TTFT_S
    if o.waiting == 0 and not slow_start:
        return Check("queue", "ok", value)
    kv_full = o.kv_total > 0 and o.kv_used / o.kv_total >= KV_WARN
    if f.max_seqs is not None and not kv_full:
        # --ctx is all sequences' cells together: it doubles with --max-seqs so each request keeps its room.
        ctx = f" and --ctx to {2 * f.n_ctx}" if f.n_ctx else ""
        advice = (
            f"requests wait for a slot: raise --max-seqs{_now(f.max_seqs, '')} to {2 * f.max_seqs}{ctx} "
            f"if memory allows, or run a second replica behind a load balancer"
        )
    else:
        advice = (
            "requests wait and the KV cache is full: run a second replica (another `qwenkit serve "
            "--port PORT`) behind a load balancer, or raise --ctx together with --max-seqs if memory allows"
        )
    return Check("queue", "warn", value, "time to first token counts queueing and prefill", advice)


def _kv_check(o: Observed, f: Facts) -> Check:
    if not o.kv_total:
        return Check("KV cache", "unknown", "the engine reports no KV cache")
    usage = o.kv_used / o.kv_total
    value = f"{o.kv_used} of {o.kv_total} cells ({usage:.0%}), {o.preemptions} preemptions"
    if usage < KV_WARN and o.preemptions == 0:
        return Check("KV cache", "ok", value)
    advice = (
        f"KV cache pressure: raise --ctx{_now(f.n_ctx, 'unknown')} if memory allows "
        f"(`qwenkit plan {f.model} --concurrency {f.max_seqs or 1}` shows the cost), "
        f"or lower --max-seqs{_now(f.max_seqs, 'unknown')}"
    )
    return Check("KV cache", "warn", value, "preempted sequences are recomputed later", advice)


def _state_cache_check(o: Observed, f: Facts) -> Check:
    if f.state_cache_mb == 0:
        return Check("state cache", "ok", "off (--state-cache-mb 0)")
    limit = f" of {f.state_cache_mb} MiB" if f.state_cache_mb else ""
    value = f"{_mib(o.state_cache_bytes)}{limit}, {o.state_cache_evictions} evictions"
    if o.state_cache_evictions == 0:
        return Check("state cache", "ok", value)
    new = 2 * f.state_cache_mb if f.state_cache_mb else 2048
    advice = (
        f"saved conversation states are dropped, so next turns prefill again: "
        f"raise --state-cache-mb{_now(f.state_cache_mb, 'unknown')} to {new} if memory allows"
    )
    return Check("state cache", "warn", value, "", advice)


def _truncation_check(o: Observed, f: Facts) -> Check:
    if o.finished == 0:
        return Check("truncated answers", "unknown", "no finished requests yet")
    share = o.truncated / o.finished
    value = f"{o.truncated} of {o.finished} answers cut by max_tokens ({share:.0%})"
    if o.finished < TRUNCATION_MIN or share < TRUNCATION_WARN:
        return Check("truncated answers", "ok", value)
    room = (
        f" (each request has --ctx / --max-seqs = {f.n_ctx // f.max_seqs} tokens)"
        if (f.n_ctx and f.max_seqs)
        else ""
    )
    advice = (
        f"thinking often runs out of tokens: send a larger max_tokens{room}, or cap thinking per request "
        f'with "thinking_budget": 1024 or "reasoning_effort": "low"; raise --ctx for more room'
    )
    detail = "a thinking answer cut short has no final answer"
    return Check("truncated answers", "warn", value, detail, advice)


def advise(observed: Observed, facts: Facts) -> list[Check]:
    """Every check on these measurements, in a fixed order."""
    return [
        rule(observed, facts)
        for rule in (
            _decode_check,
            _memory_check,
            _queue_check,
            _kv_check,
            _state_cache_check,
            _truncation_check,
        )
    ]


def overall(checks: Sequence[Check]) -> Status:
    """The worst status among the checks, "unknown" counting as ok (nothing measured is no problem)."""
    worst = max((_RANK[c.status] for c in checks), default=0)
    return "fail" if worst == 3 else "warn" if worst == 2 else "ok"


# ---- live sampling ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Sample:
    at: float
    generated: float
    steps: int
    itl_sum: float
    itl_count: float
    ttft_sum: float
    ttft_count: float
    preemptions: int
    evictions: int
    finished: float
    truncated: float


def _swap_used(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    values: dict[str, int] = {}
    try:
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("SwapTotal", "SwapFree"):
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if len(values) != 2:
        return None
    return values["SwapTotal"] - values["SwapFree"]


def _rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@cache
def _bandwidth_gbs() -> float:
    # A fact of the machine, not of an app: measured once per process (64 MiB, best of 3), off the loop.
    return hardware.memory_bandwidth(size_mib=64, repeats=3).read_gbs


def planner_decode_tok_s(target: Any, n_ctx_seq: int, batch: int) -> tuple[float | None, str]:
    """The planner's per-sequence decode estimate for a target (see _target) on this machine, at `batch`
    sequences per step."""
    from qwenkit.catalog.planner import Device, PlanRequest, plan

    if target is None or target.format_hint is None:
        return None, "not a GGUF the planner reads"
    mem = hardware.memory_info()
    device = Device("cpu", mem.total or 0, None, _bandwidth_gbs())
    request = PlanRequest(
        shape=target.shape,
        weight_format=target.format_hint,
        context=max(64, n_ctx_seq),
        concurrency=max(1, batch),
        device=device,
        layout=target.layout,
    )
    speed = plan(request, suggest=False).speed
    if speed.aggregate_tok_s is None:
        return None, speed.basis
    return speed.aggregate_tok_s / max(1, batch), speed.basis


def _target(gguf: Path) -> Any:
    """The planner's view of a GGUF (its shape and real tensors), or None when it cannot read it."""
    from qwenkit.catalog.schema import load_catalog
    from qwenkit.catalog.target import TargetError, resolve_target

    try:
        return resolve_target(str(gguf), load_catalog())
    except (TargetError, OSError, ValueError):
        return None


class HealthMonitor:
    """Samples one server's counters at each call; measures over the last WINDOW_S seconds."""

    def __init__(self, engine: Engine, metrics: ServeMetrics, model: str) -> None:
        self.engine = engine
        self.metrics = metrics
        self.samples: deque[_Sample] = deque()
        self._lock = threading.Lock()
        config = getattr(engine, "config", None)
        info = getattr(getattr(engine, "model", None), "info", None)
        self.gguf: Path | None = getattr(info, "path", None)
        self.facts = Facts(
            model=str(self.gguf) if self.gguf else model,
            threads=getattr(config, "threads", None),
            physical_cores=hardware.physical_cores(),
            max_seqs=getattr(config, "max_seqs", None),
            n_ctx=getattr(config, "n_ctx", None),
            state_cache_mb=getattr(config, "state_cache_mb", None),
        )
        self._expected: dict[int, tuple[float | None, str]] = {}
        self._target: Any = False  # False: not read yet; None: the planner cannot read it

    def _value(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def _sample(self) -> _Sample:
        stats = self.engine.stats()
        v = self._value
        return _Sample(
            at=time.monotonic(),
            generated=v("qwenkit_generation_tokens_total"),
            steps=stats.steps,
            itl_sum=v("qwenkit_inter_token_latency_seconds_sum"),
            itl_count=v("qwenkit_inter_token_latency_seconds_count"),
            ttft_sum=v("qwenkit_time_to_first_token_seconds_sum"),
            ttft_count=v("qwenkit_time_to_first_token_seconds_count"),
            preemptions=stats.preemptions,
            evictions=stats.state_cache_evictions,
            finished=sum(
                s.value
                for m in self.metrics.finished.collect()
                for s in m.samples
                if s.name.endswith("_total")
            ),
            truncated=v("qwenkit_finished_requests_total", {"reason": "length"}),
        )

    def expected(self, batch: int) -> tuple[float | None, str]:
        """The planner's estimate at `batch` sequences per step (cached; blocking: call off the loop)."""
        if self.gguf is None:
            return None, "no planner estimate for this engine"
        if batch not in self._expected:
            per_seq = (self.facts.n_ctx or 4096) // max(1, self.facts.max_seqs or 1)
            if self._target is False:
                self._target = _target(self.gguf)
            try:
                self._expected[batch] = planner_decode_tok_s(self._target, per_seq, batch)
            except (ValueError, OSError) as error:
                self._expected[batch] = None, f"planner failed: {error}"
        return self._expected[batch]

    def observe(self) -> Observed:
        """Take a sample and measure over the window (blocking: call off the event loop)."""
        with self._lock:
            now = self._sample()
            self.samples.append(now)
            while len(self.samples) > 1 and now.at - self.samples[0].at > WINDOW_S:
                self.samples.popleft()
            # A window needs two samples; with one, everything since the start counts.
            first = self.samples[0] if len(self.samples) > 1 else None
        d = _diff(now, first)
        decode = d.itl_count / d.itl_sum if d.itl_sum > 0 and d.itl_count > 0 else None
        batch = d.generated / d.steps if d.steps > 0 and d.generated > 0 else None
        expected, basis = self.expected(max(1, round(batch or 1))) if decode is not None else (None, "")
        stats = self.engine.stats()
        mem = hardware.memory_info()
        window = now.at - first.at if first else 0.0
        return Observed(
            window_s=window,
            decode_tok_s=decode,
            expected_tok_s=expected,
            expected_basis=basis,
            batch=batch,
            throughput_tok_s=d.generated / window if window > 0 else None,
            running=stats.running,
            waiting=stats.waiting,
            ttft_mean_s=d.ttft_sum / d.ttft_count if d.ttft_count > 0 else None,
            kv_used=stats.kv_used,
            kv_total=stats.kv_total,
            preemptions=d.preemptions,
            state_cache_bytes=stats.state_cache_bytes,
            state_cache_evictions=d.evictions,
            memory_total=mem.total,
            memory_available=mem.available,
            process_rss=_rss(),
            swap_used=_swap_used(),
            load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            cpus=len(hardware.usable_cpus()),
            finished=int(d.finished),
            truncated=int(d.truncated),
        )

    def report(self) -> dict[str, Any]:
        observed = self.observe()
        checks = advise(observed, self.facts)
        return {
            "verdict": overall(checks),
            "checks": [asdict(c) for c in checks],
            "measured": asdict(observed),
            "settings": asdict(self.facts),
        }


def _diff(now: _Sample, first: _Sample | None) -> _Sample:
    if first is None:
        return now
    return _Sample(*(a - b for a, b in zip(asdict(now).values(), asdict(first).values(), strict=True)))


def _check_key(request: Request, ctx: Any, keys: Sequence[str]) -> None:
    """The verbose report's key check, under the same wrong-key lockout as every other path."""
    from qwenkit.serve.security import _bearer, _too_many

    token = _bearer(request.headers.raw) or b""
    if any([hmac.compare_digest(token, k.encode("utf-8")) for k in keys]):  # every key, constant time
        return
    address = f"ip:{request.client.host if request.client else '?'}"
    locked = ctx.limiter.auth_lockout(address)
    if locked is not None:
        raise _too_many(
            "too many requests with a wrong API key from this address", "too_many_auth_failures", locked
        )
    ctx.limiter.auth_failed(address)
    raise APIError(
        401,
        "/health?verbose=1 describes the machine: send the header 'Authorization: Bearer <key>'",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def health_response(request: Request, ctx: Any) -> JSONResponse:
    """GET /health: status and engine counts; with ?verbose=1 the checks and what they measured."""
    stats = ctx.engine.stats()
    keys = [k.get_secret_value() for k in ctx.config.api_keys]
    body: dict[str, Any] = {"status": "draining" if ctx.draining else "ok"}
    if not keys:  # /health needs no key: with keys set it does not say what is served
        body["model"] = ctx.model_name
    body["engine"] = {
        "running": stats.running,
        "waiting": stats.waiting,
        "kv_used": stats.kv_used,
        "kv_total": stats.kv_total,
    }
    if request.query_params.get("verbose", "0").lower() not in ("", "0", "false", "no"):
        if keys:
            _check_key(request, ctx, keys)
        monitor = getattr(request.app.state, "qwenkit_health", None)
        if monitor is None:  # one per app, made on first use (the app's state, never the module's)
            monitor = HealthMonitor(ctx.engine, ctx.metrics, ctx.model_name)
            request.app.state.qwenkit_health = monitor
        # "status" keeps its meaning (ok / draining); "verdict" is the worst check.
        body |= await run_in_threadpool(monitor.report)
    return JSONResponse(body, status_code=503 if ctx.draining else 200)
