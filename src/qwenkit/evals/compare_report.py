"""The `qwenkit compare` report: per-variant numbers, select's pick checked against them, JSON/HTML/PNG files.

Contract: VariantResult holds one variant's measurements (memory planned and measured, tok/s at one and
at N streams, fidelity against its model's most precise variant, task scores); CompareReport holds them
all plus the settings. select_format() applies `qwenkit select`'s ranking (catalog fidelity × its speed
factor, only formats select would run on this device, only plans that fit) to one model's compared
formats; check_recommendation() then says, from the measurements alone, whether that pick fits this
machine as measured and whether it is the fastest variant whose top-1 agreement stays ≥ min_agreement.
write_report() writes compare.json, compare.html (self-contained: inline CSS, PNGs as base64, every
string escaped) and, when matplotlib is installed, quality_vs_memory.png and quality_vs_speed.png.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qwenkit.catalog.measure import RuntimeBaseline
from qwenkit.catalog.planner import Device
from qwenkit.paths import atomic_write

__all__ = [
    "PLOTS_HINT",
    "CompareReport",
    "Recommendation",
    "VariantResult",
    "check_recommendation",
    "recommend",
    "select_format",
    "write_report",
]

PLOTS_HINT = "plots need matplotlib: pip install 'qwenkit[plots]'"
MIB = 1024**2
# Speeds this close count as a tie: single runs on a busy laptop vary by a few percent.
SPEED_TIE = 0.05


@dataclass(frozen=True)
class VariantResult:
    model: str
    format: str
    path: str
    file_type: str
    size_bytes: int
    planned_peak_bytes: int | None
    planned_fits: bool | None
    measured_peak_bytes: int
    tok_s_single: float
    tok_s_multi: float
    task_score: float | None = None
    task_scores: dict[str, float] = field(default_factory=dict)
    task_errors: int = 0  # samples whose request or scorer failed (they score 0)
    reference_format: str | None = None
    kl_mean: float | None = None
    kl_p99: float | None = None
    kl_max: float | None = None
    top1_agreement: float | None = None
    perplexity: float | None = None
    ppl_ratio: float | None = None

    @property
    def label(self) -> str:
        return f"{self.model} {self.format}"

    @property
    def plan_error(self) -> float | None:
        """planned / measured peak memory - 1."""
        if self.planned_peak_bytes is None or not self.measured_peak_bytes:
            return None
        return self.planned_peak_bytes / self.measured_peak_bytes - 1


@dataclass(frozen=True)
class Recommendation:
    """select's pick for one model among the compared formats, and how it fares against the measurements."""

    model: str
    format: str | None  # None: no compared format that select would run fits
    prefer: str
    fits_measured: bool | None  # measured peak ≤ the device's budget
    fastest_ok: str | None  # the fastest variant (single stream) keeping agreement ≥ min_agreement
    confirmed: bool  # the pick fits as measured, keeps the agreement and is that fastest (within SPEED_TIE)
    verdict: str


@dataclass(frozen=True)
class CompareReport:
    variants: tuple[VariantResult, ...]
    streams: int
    threads: int
    context_per_seq: int
    input_len: int
    output_len: int
    quick: bool
    tasks: tuple[str, ...]
    min_agreement: float
    device: dict[str, Any] | None
    recommendation: tuple[Recommendation, ...] | None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for row, v in zip(out["variants"], self.variants, strict=True):
            row["plan_error"] = v.plan_error
        return out


# ---- select's pick, checked ------------------------------------------------------------------------
def select_format(
    paths: dict[str, Path], device: Device, runtime: RuntimeBaseline, context: int, prefer: str
) -> tuple[str | None, str]:
    """The format `qwenkit select` would run this model in on `device` (one user), and why."""
    # select's own ranking pieces, so the policy lives in one place.
    from qwenkit.catalog.planner import Engine, PlanRequest
    from qwenkit.catalog.schema import load_catalog
    from qwenkit.catalog.select import CPU_GGUF_FORMATS, fitting_plan, speed_factor
    from qwenkit.catalog.target import resolve_target

    catalog = load_catalog()
    best: tuple[float, int, str] | None = None
    cache: dict = {}
    runnable = {f.value for f in CPU_GGUF_FORMATS}
    for fmt, path in paths.items():
        if fmt not in runnable:
            continue  # select runs 16/32-bit weights on vLLM only, never as a CPU GGUF
        target = resolve_target(str(path), catalog)
        assert target.format_hint is not None
        base = PlanRequest(
            target.shape, target.format_hint, context, 1, device, engine=Engine.LLAMACPP, runtime=runtime,
            layout=target.layout,
        )  # fmt: skip
        found = fitting_plan(base, cache)
        if found is None:
            continue
        p, _ = found
        score = catalog.fidelity.get(target.format_hint, 0.9) * speed_factor(p, prefer)  # type: ignore[arg-type]
        key = (score, -p.speed.bytes_per_token, fmt)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:
        return None, "no compared format that select runs on this device (q8_0 … q4_0 GGUF) fits"
    why = {
        "quality": "the most faithful format that fits",
        "latency": "fidelity × √(estimated single-stream tok/s)",
        "throughput": "fidelity × √(estimated aggregate tok/s)",
    }.get(prefer, prefer)
    return best[2], f"select --prefer {prefer}: {why}"


def check_recommendation(
    report: CompareReport, model: str, chosen: str | None, why: str, budget: int | None, prefer: str
) -> Recommendation:
    """Whether select's pick fits as measured and is the fastest variant keeping agreement ≥ the threshold."""
    mine = [v for v in report.variants if v.model == model]
    ok = [v for v in mine if v.top1_agreement is not None and v.top1_agreement >= report.min_agreement]
    if budget is not None:
        ok = [v for v in ok if v.measured_peak_bytes <= budget]
    fastest = max(ok, key=lambda v: v.tok_s_single, default=None)
    pick = next((v for v in mine if v.format == chosen), None)
    if pick is None:
        verdict = f"{model}: {why}."
        if fastest is not None:
            verdict += f" Fastest measured with agreement ≥ {report.min_agreement:.2f}: {fastest.format}."
        return Recommendation(model, None, prefer, None, fastest.format if fastest else None, False, verdict)
    fits = None if budget is None else pick.measured_peak_bytes <= budget
    tie = fastest is not None and pick.tok_s_single >= (1 - SPEED_TIE) * fastest.tok_s_single
    ok_pick = pick.top1_agreement is not None and pick.top1_agreement >= report.min_agreement
    confirmed = bool(fits is not False and ok_pick and tie)
    mem = f"measured {pick.measured_peak_bytes / MIB:.0f} MiB"
    fit_text = ""
    if budget is not None:
        fit_text = (" fits" if fits else " does NOT fit") + f" ({mem} of {budget / MIB:.0f} MiB)"
    keep = f"keeps top-1 agreement ≥ {report.min_agreement:.2f}"
    best = "" if fastest is None else f"{fastest.format} ({fastest.tok_s_single:.1f} tok/s)"
    if fastest is None:
        tail = f"no variant {keep}" + ("" if budget is None else " and fits")
    elif not ok_pick:
        tail = (
            f"its top-1 agreement {pick.top1_agreement or 0:.3f} is too low; the fastest that {keep}: {best}"
        )
    elif fits is False:
        tail = f"the fastest that fits and {keep}: {best}"
    elif fastest.format == pick.format:
        tail = f"it is the fastest ({pick.tok_s_single:.1f} tok/s) that {keep}"
    elif confirmed:
        speeds = f"{pick.tok_s_single:.1f} vs {fastest.tok_s_single:.1f} tok/s"
        tail = f"it is within {SPEED_TIE:.0%} of the fastest that {keep} ({fastest.format}: {speeds})"
    else:
        speeds = f"{fastest.tok_s_single:.1f} vs {pick.tok_s_single:.1f} tok/s"
        tail = f"{fastest.format} is faster ({speeds}) and {keep} ({fastest.top1_agreement:.3f})"
    verdict = f"{model}: select picks {pick.format} ({why}); it{fit_text}; {tail}."
    return Recommendation(
        model, pick.format, prefer, fits, fastest.format if fastest else None, confirmed, verdict
    )


def recommend(
    report: CompareReport, device: Device | None, runtime: RuntimeBaseline, prefer: str
) -> tuple[Recommendation, ...] | None:
    """select's pick per model, checked against the report's measurements; None without a device."""
    if device is None:
        return None
    budget = device.budget()[0]
    out = []
    for model in dict.fromkeys(v.model for v in report.variants):
        paths = {v.format: Path(v.path) for v in report.variants if v.model == model}
        chosen, why = select_format(paths, device, runtime, report.context_per_seq, prefer)
        out.append(check_recommendation(report, model, chosen, why, budget, prefer))
    return tuple(out)


# ---- files -----------------------------------------------------------------------------------------
def _quality(v: VariantResult, by_score: bool) -> float | None:
    return v.task_score if by_score else v.kl_mean


def plots_task_scores(report: CompareReport) -> bool:
    """Whether the plots' quality axis is the task score (else KL divergence against the reference)."""
    scores = [v.task_score for v in report.variants]
    if not report.tasks or None in scores:
        return False
    # Scores that are all equal (e.g. random-weight demos, all 0) say nothing when fidelity is there.
    return len(set(scores)) > 1 or all(v.kl_mean is None for v in report.variants)


def plot_files(report: CompareReport, out_dir: Path) -> list[Path]:
    """quality_vs_memory.png and quality_vs_speed.png; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    by_score = plots_task_scores(report)
    ylabel = "task score (higher is better)" if by_score else "KL divergence vs reference (lower is better)"
    written = []
    for name, xlabel, xs in (
        ("quality_vs_memory.png", "measured peak memory (MiB)", lambda v: v.measured_peak_bytes / MIB),
        ("quality_vs_speed.png", "single-stream output tok/s", lambda v: v.tok_s_single),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
        for model in dict.fromkeys(v.model for v in report.variants):
            mine = [v for v in report.variants if v.model == model and _quality(v, by_score) is not None]
            points = [(xs(v), _quality(v, by_score), v.format) for v in mine]
            ax.plot([p[0] for p in points], [p[1] for p in points], "o", label=model)
            for x, y, fmt in points:
                ax.annotate(fmt, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if not by_score:
            ax.set_yscale("symlog", linthresh=1e-6)  # the reference sits at KL 0
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table_rows(report: CompareReport) -> tuple[list[str], list[list[str]]]:
    """Column names and formatted rows, shared by the rich table and the HTML."""
    head = ["model", "format", "file MiB", "planned MiB", "measured MiB", "plan error", "tok/s 1",
            f"tok/s {report.streams}", "KL mean", "KL p99", "top-1 same", "PPL ratio"]  # fmt: skip
    if report.tasks:
        head.append("task score")
    rows = []
    for v in report.variants:
        planned = None if v.planned_peak_bytes is None else v.planned_peak_bytes / MIB
        row = [
            v.model,
            v.format + (" (ref)" if v.format == v.reference_format else ""),
            _fmt(v.size_bytes / MIB, ".1f"),
            _fmt(planned, ".0f"),
            _fmt(v.measured_peak_bytes / MIB, ".0f"),
            _fmt(v.plan_error, "+.1%"),
            _fmt(v.tok_s_single, ".1f"),
            _fmt(v.tok_s_multi, ".1f"),
            _fmt(v.kl_mean, ".3g"),
            _fmt(v.kl_p99, ".3g"),
            _fmt(v.top1_agreement, ".3f"),
            _fmt(v.ppl_ratio, ".4f"),
        ]
        if report.tasks:
            errors = f" ({v.task_errors} failed)" if v.task_errors else ""
            row.append(_fmt(v.task_score, ".3f") + errors)
        rows.append(row)
    return head, rows


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _html(report: CompareReport, images: list[Path], plots_note: str | None) -> str:
    e = html.escape
    head, rows = table_rows(report)
    table = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>\n"
    table += "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    recs = "".join(f"<li>{e(r.verdict)}</li>" for r in report.recommendation or ())
    recs = f"<ul>{recs}</ul>" if recs else "<p>No device described: no recommendation checked.</p>"
    figs = "".join(
        f'<figure><img alt="{e(p.stem)}" src="data:image/png;base64,{_b64(p)}">'
        f"<figcaption>{e(p.stem.replace('_', ' '))}</figcaption></figure>"
        for p in images
    )
    if plots_note:
        figs += f"<p>{e(plots_note)}</p>"
    settings = (
        f"{report.threads} threads · {report.streams} streams · "
        f"context {report.context_per_seq} per sequence · "
        f"prompts ≈{report.input_len} tokens, {report.output_len} new tokens"
        + (" · quick" if report.quick else "")
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qwenkit compare</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}
figure{{display:inline-block;margin:1em}}</style></head><body>
<h1>qwenkit compare</h1><p>{e(settings)}</p>
<h2>Variants</h2><table>{table}</table>
<p>Memory: planned = the planner's predicted peak; measured = peak resident memory (VmHWM) of the
<code>qwenkit serve</code> process. Fidelity: KL divergence and top-1 agreement against each model's most
precise variant (ref), as llama.cpp's perplexity --kl-divergence reports them.</p>
<h2>Recommendation</h2>{recs}
<h2>Plots</h2>{figs}
</body></html>
"""


def write_report(report: CompareReport, out_dir: Path) -> list[Path]:
    """compare.json, the PNGs (with matplotlib) and compare.html in out_dir; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "compare.json"
    atomic_write(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
    images = plot_files(report, out_dir)
    html_path = out_dir / "compare.html"
    atomic_write(html_path, _html(report, images, None if images else PLOTS_HINT))
    return [json_path, *images, html_path]
