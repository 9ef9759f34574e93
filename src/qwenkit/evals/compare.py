"""`qwenkit compare`: one model in several formats (and sizes), measured side by side on this machine.

Contract: run_compare(CompareConfig) prepares every variant once (an HF checkpoint is converted with
ensure_gguf into the qwenkit cache; k-quants and q4_0 are quantized from its f16/bf16 GGUF into the same
cache folder; a float .gguf is quantized into <cache>/compare/<key>/), then, one variant at a time, starts
`qwenkit serve` as a subprocess on a free port (threads explicit, `streams` sequences), measures single-
and multi-stream output tok/s through qwenkit.bench's run_bench, task scores through qwenkit.evals'
run_eval when tasks are given, and the server's peak resident memory (VmHWM of its process), and stops it
before the next starts (never two servers at once). Afterwards each model's variants are scored by
qwenkit.evals.fidelity against the most precise of them. The planner's predicted peak memory for the same
configuration sits next to the measured one, and recommend() checks which variant `qwenkit select`'s policy
would pick against the measurements. Bad input raises CompareError (a ValueError), one line naming the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from qwenkit.catalog.measure import RuntimeBaseline
from qwenkit.catalog.planner import FALLBACK_BASELINE, Device
from qwenkit.evals.compare_report import CompareReport, Recommendation, VariantResult, recommend
from qwenkit.hardware import physical_cores

__all__ = [
    "FLOAT_FORMATS",
    "FORMATS",
    "CompareConfig",
    "CompareError",
    "CompareReport",
    "Recommendation",
    "VariantResult",
    "prepare_variants",
    "recommend",
    "run_compare",
]

FLOAT_FORMATS = ("f32", "bf16", "f16")  # most precise first
QUANT_FORMATS = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
FORMATS = FLOAT_FORMATS + QUANT_FORMATS  # precision order: the first present is the fidelity reference
_CONVERTED = ("f32", "f16", "bf16", "q8_0")  # what the converter writes directly from a checkpoint
_FTYPE = {name.upper(): name for name in FORMATS}  # llama.cpp's file type name → the format
Say = Callable[[str], None]


class CompareError(ValueError):
    """A compare that cannot run as asked; the message is one line naming the fix."""


@dataclass(frozen=True)
class CompareConfig:
    """What to compare and how hard to measure it. `quick`: few short requests, one short fidelity window."""

    models: tuple[str, ...]  # MODEL, then --sizes
    formats: tuple[str, ...] = ("f16", "q8_0", "q4_k_m", "q4_0")
    threads: int = field(default_factory=physical_cores)
    streams: int = 16
    tasks: tuple[str, ...] = ()
    quick: bool = False
    min_agreement: float = 0.9
    prefer: str = "quality"  # as `qwenkit select` defaults
    device: Device | None = None  # None: no plan (planned memory left out)
    runtime: RuntimeBaseline = FALLBACK_BASELINE
    fidelity_text: Path | None = None
    server_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise CompareError(f"unknown format {unknown[0]!r}: use some of {', '.join(FORMATS)}")
        if not self.formats:
            raise CompareError("--formats is empty: give e.g. f16,q8_0,q4_k_m,q4_0")
        if len(set(self.formats)) != len(self.formats):
            raise CompareError("--formats names a format twice: give each once")
        if self.prefer not in ("quality", "latency", "throughput"):
            raise CompareError(f"unknown preference {self.prefer!r}: use quality, latency or throughput")
        if not 0 < self.min_agreement <= 1:
            raise CompareError(f"--min-agreement {self.min_agreement} must be in (0, 1]")

    # The measurement settings: --quick keeps a tiny demo's compare to seconds.
    @property
    def input_len(self) -> int:
        return 32 if self.quick else 128

    @property
    def output_len(self) -> int:
        return 16 if self.quick else 128

    @property
    def single_requests(self) -> int:
        return 3 if self.quick else 8

    @property
    def multi_requests(self) -> int:
        return self.streams if self.quick else 2 * self.streams

    @property
    def eval_max_tokens(self) -> int:
        return 64 if self.quick else 512

    @property
    def context_per_seq(self) -> int:
        # Prompt (the bench's prompt lengths are approximate) plus answer, rounded up to 256 cells; eval
        # prompts (tool schemas, code) get 1024 tokens of room.
        need = 2 * self.input_len + self.output_len + 64
        if self.tasks:
            need = max(need, 1024 + self.eval_max_tokens)
        return -(-need // 256) * 256

    @property
    def fidelity_ctx(self) -> int:
        return 128 if self.quick else 512

    @property
    def fidelity_chunks(self) -> int:
        return 1 if self.quick else 4


@dataclass(frozen=True)
class Variant:
    model: str
    format: str
    path: Path


# ---- preparing the variants ------------------------------------------------------------------------
def prepare_variants(
    model: str, formats: tuple[str, ...], threads: int, say: Say | None = None
) -> list[Variant]:
    """Every requested format of `model` as a GGUF, converted or quantized once into the qwenkit cache."""
    from qwenkit.checkpoints.resolve import resolve_model
    from qwenkit.gguf.reader import read_gguf_info

    note = say or (lambda text: None)
    resolved = resolve_model(model)
    name = resolved.name or resolved.path.name
    out: list[Variant] = []
    if resolved.kind == "hf":
        from qwenkit.gguf.convert import ensure_gguf

        for fmt in formats:
            if fmt in _CONVERTED:
                note(f"{name}: {fmt} GGUF")
                out.append(Variant(name, fmt, ensure_gguf(resolved.path, fmt)))  # type: ignore[arg-type]
            else:
                source_fmt = "bf16" if "bf16" in formats else "f16"
                source = ensure_gguf(resolved.path, source_fmt)  # type: ignore[arg-type]
                out.append(Variant(name, fmt, _quantized(source, source.parent, fmt, threads, note, name)))
        return out
    info = read_gguf_info(resolved.path)
    own = _FTYPE.get(info.file_type_name)
    stat = resolved.path.stat()
    key = hashlib.sha256(f"{resolved.path.resolve()} {stat.st_size} {stat.st_mtime_ns}".encode()).hexdigest()
    from qwenkit.paths import cache_root

    folder = cache_root() / "compare" / key[:32]
    for fmt in formats:
        if fmt == own:
            out.append(Variant(name, fmt, resolved.path))
        elif own not in FLOAT_FORMATS or fmt in FLOAT_FORMATS:
            raise CompareError(
                f"{resolved.path.name} is {info.file_type_name}, it cannot become {fmt}: pass an f16/bf16 "
                "GGUF or the checkpoint directory"
            )
        else:
            out.append(Variant(name, fmt, _quantized(resolved.path, folder, fmt, threads, note, name)))
    return out


def _quantized(source: Path, folder: Path, fmt: str, threads: int, note: Say, name: str) -> Path:
    from qwenkit.gguf.quantize import quantize_gguf

    target = folder / f"model-{fmt}.gguf"
    if not target.is_file():
        note(f"{name}: quantizing to {fmt}")
        quantize_gguf(source, target, fmt, threads=threads)  # type: ignore[arg-type]
    return target


# ---- serving one variant ---------------------------------------------------------------------------
_URL = re.compile(r"http://127\.0\.0\.1:(\d+)/v1")


@dataclass(frozen=True)
class Server:
    url: str  # ends in /v1
    pid: int

    def peak_rss(self) -> int:
        """The server process's peak resident memory so far (VmHWM), in bytes."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise CompareError(f"no VmHWM for process {self.pid}: measuring memory needs Linux /proc")


@contextlib.contextmanager
def serving(
    gguf: Path, name: str, threads: int, streams: int, n_ctx: int, timeout: float = 300.0
) -> Iterator[Server]:
    """`qwenkit serve` on a free loopback port in a subprocess, until the block ends."""
    cmd = [sys.executable, "-m", "qwenkit", "serve", "--model", str(gguf), "--port", "0"]
    cmd += ["--threads", str(threads), "--max-seqs", str(streams), "--ctx", str(n_ctx)]
    cmd += ["--max-waiting", str(4 * streams), "--state-cache-mb", "0", "--served-model-name", name]
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    env.pop("QWENKIT_API_KEY", None)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
        try:
            yield Server(_wait_ready(proc, log, timeout), proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], log: object, timeout: float) -> str:
    def text() -> str:
        log.seek(0)  # type: ignore[attr-defined]
        return log.read().decode("utf-8", "replace")  # type: ignore[attr-defined]

    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last = (text().strip().splitlines() or ["no output"])[-1]
            raise CompareError(f"qwenkit serve exited ({proc.returncode}): {last}")
        if url is None and (match := _URL.search(text())):
            url = f"http://127.0.0.1:{match.group(1)}"
        if url is not None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return f"{url}/v1"
        time.sleep(0.1)
    raise CompareError(f"qwenkit serve was not ready within {timeout:.0f} s: try a smaller model or --quick")


def measure_speed(url: str, streams: int, requests: int, config: CompareConfig) -> float:
    """Output tok/s of `requests` streaming completions at `streams` concurrent (qwenkit.bench)."""
    from qwenkit.bench import BenchConfig, run_bench

    bench = BenchConfig(
        base_url=url,
        concurrency=[streams],
        num_requests=requests,
        input_len=config.input_len,
        output_len=config.output_len,
        warmup=1,
    )
    return run_bench(bench).level(concurrency=streams).output_tok_s


def measure_tasks(url: str, config: CompareConfig) -> tuple[float, dict[str, float], int]:
    """Mean task score, per-task scores and failed samples through qwenkit.evals' run_eval (no cache)."""
    from qwenkit.evals.runner import EvalConfig, run_eval

    report = run_eval(
        EvalConfig(
            base_url=url,
            tasks=list(config.tasks),
            limit=4 if config.quick else None,
            max_tokens=config.eval_max_tokens,
            cache=False,
        )
    )
    errors = sum(task.errors for task in report.tasks.values())
    return report.score, {name: task.score for name, task in report.tasks.items()}, errors


def _planned(path: Path, config: CompareConfig) -> tuple[int | None, bool | None]:
    """The planner's peak resident memory for this GGUF served as configured, and whether it fits."""
    if config.device is None:
        return None, None
    from qwenkit.catalog.planner import PlanRequest, plan
    from qwenkit.catalog.schema import load_catalog
    from qwenkit.catalog.target import resolve_target

    target = resolve_target(str(path), load_catalog())
    assert target.format_hint is not None
    p = plan(
        PlanRequest(
            shape=target.shape,
            weight_format=target.format_hint,
            context=config.context_per_seq,
            concurrency=config.streams,
            device=config.device,
            runtime=config.runtime,
            layout=target.layout,
        ),
        suggest=False,
    )
    return p.memory.peak, p.fits


def run_compare(config: CompareConfig, say: Say | None = None) -> CompareReport:
    """Prepare, serve and measure every variant, then score fidelity and recommend (module docstring)."""
    from qwenkit.gguf.reader import read_gguf_info

    note = say or (lambda text: None)
    if not config.models:
        raise CompareError("no model given: pass a checkpoint directory or a .gguf")
    if config.tasks:
        from qwenkit.evals.tasks import load_tasks

        load_tasks(list(config.tasks), limit=1)  # a bad task name or file fails now, not after serving
    ordered = sorted(config.formats, key=FORMATS.index)
    variants = [v for m in config.models for v in prepare_variants(m, tuple(ordered), config.threads, note)]
    results: list[VariantResult] = []
    for v in variants:
        info = read_gguf_info(v.path)
        planned, fits = _planned(v.path, config)
        label = f"{v.model}-{v.format}"
        note(f"{label}: serving and measuring")
        with serving(
            v.path, label, config.threads, config.streams, config.streams * config.context_per_seq,
            config.server_timeout_s,
        ) as server:  # fmt: skip
            single = measure_speed(server.url, 1, config.single_requests, config)
            multi = measure_speed(server.url, config.streams, config.multi_requests, config)
            score, scores, errors = measure_tasks(server.url, config) if config.tasks else (None, {}, 0)
            peak = server.peak_rss()
        results.append(
            VariantResult(
                model=v.model,
                format=v.format,
                path=str(v.path),
                file_type=info.file_type_name,
                size_bytes=info.size_bytes,
                planned_peak_bytes=planned,
                planned_fits=fits,
                measured_peak_bytes=peak,
                tok_s_single=single,
                tok_s_multi=multi,
                task_score=score,
                task_scores=scores,
                task_errors=errors,
            )
        )
    results = _with_fidelity(results, config, note)
    report = CompareReport(
        variants=tuple(results),
        streams=config.streams,
        threads=config.threads,
        context_per_seq=config.context_per_seq,
        input_len=config.input_len,
        output_len=config.output_len,
        quick=config.quick,
        tasks=config.tasks,
        min_agreement=config.min_agreement,
        device=_device_dict(config.device),
        recommendation=None,
    )
    return replace(report, recommendation=recommend(report, config.device, config.runtime, config.prefer))


def _with_fidelity(results: list[VariantResult], config: CompareConfig, note: Say) -> list[VariantResult]:
    """Each model's variants scored against its most precise one (results are in precision order)."""
    from qwenkit.evals.fidelity import FidelityConfig, run_fidelity

    out: list[VariantResult] = []
    for model in dict.fromkeys(r.model for r in results):
        mine = [r for r in results if r.model == model]
        ref, rest = mine[0], mine[1:]
        note(f"{model}: fidelity against {ref.format}")
        report = run_fidelity(
            FidelityConfig(
                reference=Path(ref.path),
                candidates=tuple(Path(r.path) for r in rest),
                text=config.fidelity_text,
                ctx=config.fidelity_ctx,
                chunks=config.fidelity_chunks,
                threads=config.threads,
            )
        )
        for r, fid in zip(mine, report.variants, strict=True):
            out.append(
                replace(
                    r,
                    reference_format=ref.format,
                    kl_mean=fid.kl_mean,
                    kl_p99=fid.kl_p99,
                    kl_max=fid.kl_max,
                    top1_agreement=fid.top1_agreement,
                    perplexity=fid.perplexity,
                    ppl_ratio=fid.ppl_ratio,
                )
            )
    return out


def _device_dict(device: Device | None) -> dict[str, object] | None:
    if device is None:
        return None
    budget, basis = device.budget()
    return {
        "kind": device.kind,
        "name": device.name,
        "total_bytes": device.total_bytes,
        "available_bytes": device.available_bytes,
        "bandwidth_gbs": device.bandwidth_gbs,
        "budget_bytes": budget,
        "budget_basis": basis,
    }
