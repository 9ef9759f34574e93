"""The eval report: per-sample results, per-task summaries, and the JSON + self-contained HTML files.

Contract: summarise(task, samples) computes a TaskReport: score = mean sample score over all n samples
(a sample that errored scores 0 and is counted in errors), reasoning length in characters (and tokens
when the server reports usage.completion_tokens_details.reasoning_tokens), the rate of answers cut off
(finish_reason "length") and of those cut off while still inside the think block. write_report() writes
eval.json and eval.html into a directory, each through a temp file and a rename, and returns the paths.
The HTML needs no network (inline CSS, no scripts) and escapes every model-written string.
"""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from qwenkit.paths import atomic_write

SAMPLE_TEXT_CHARS = 2000  # how much of each answer the report keeps


class SampleResult(BaseModel):
    """One case's outcome."""

    task: str
    id: str
    scorer: str
    score: float = 0.0
    detail: str = ""
    error: str | None = None  # the request or the scorer failed
    content: str = ""
    reasoning_chars: int = 0
    reasoning_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    cut_off: bool = False
    cut_off_in_thinking: bool = False
    cached: bool = False


class TaskReport(BaseModel):
    name: str
    n: int
    score: float
    scorers: list[str]
    errors: int
    cached: int
    reasoning_chars_mean: float
    reasoning_chars_p50: float
    reasoning_tokens_mean: float | None = None
    reasoning_tokens_p50: float | None = None
    completion_tokens_mean: float | None = None
    cut_off_rate: float
    cut_off_in_thinking_rate: float
    error_examples: list[str] = Field(default_factory=list)


class EvalReport(BaseModel):
    """What run_eval returns and writes: tasks[name].score etc., and every sample."""

    endpoint: str
    model: str
    params: dict[str, Any]
    tasks: dict[str, TaskReport]
    samples: list[SampleResult]
    requests_sent: int
    answers_from_cache: int
    wall_s: float

    @property
    def score(self) -> float:
        """The mean of the task scores (each task weighs the same)."""
        return statistics.fmean(t.score for t in self.tasks.values()) if self.tasks else 0.0


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def summarise(name: str, samples: list[SampleResult]) -> TaskReport:
    n = len(samples)
    reasoning = [float(s.reasoning_chars) for s in samples if s.error is None or s.finish_reason]
    tokens = [float(s.reasoning_tokens) for s in samples if s.reasoning_tokens is not None]
    completion = [float(s.completion_tokens) for s in samples if s.completion_tokens is not None]
    errors = [s for s in samples if s.error is not None]
    return TaskReport(
        name=name,
        n=n,
        score=_mean([s.score for s in samples]),
        scorers=sorted({s.scorer for s in samples}),
        errors=len(errors),
        cached=sum(s.cached for s in samples),
        reasoning_chars_mean=_mean(reasoning),
        reasoning_chars_p50=statistics.median(reasoning) if reasoning else 0.0,
        reasoning_tokens_mean=_mean(tokens) if tokens else None,
        reasoning_tokens_p50=statistics.median(tokens) if tokens else None,
        completion_tokens_mean=_mean(completion) if completion else None,
        cut_off_rate=sum(s.cut_off for s in samples) / n if n else 0.0,
        cut_off_in_thinking_rate=sum(s.cut_off_in_thinking for s in samples) / n if n else 0.0,
        error_examples=sorted({e.error or "" for e in errors})[:5],
    )


def write_report(report: EvalReport, out: Path) -> tuple[Path, Path]:
    """eval.json and eval.html in out; returns their paths."""
    json_path, html_path = out / "eval.json", out / "eval.html"
    atomic_write(json_path, report.model_dump_json(indent=2) + "\n")
    atomic_write(html_path, render_html(report))
    return json_path, html_path


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:80rem}
table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.bad{color:#a00}pre{white-space:pre-wrap;margin:0;max-width:50rem}
details{margin:.3rem 0}summary{cursor:pointer}
"""


def render_html(report: EvalReport) -> str:
    """A self-contained HTML page: the summary table, then each task's samples (failures first)."""
    e = html.escape
    head = (
        "<tr><th class=l>task</th><th>score</th><th>n</th><th>errors</th><th>cut off</th>"
        "<th>cut off in thinking</th><th>reasoning chars (mean / p50)</th>"
        "<th>reasoning tokens (mean / p50)</th>"
        "<th>completion tokens (mean)</th><th class=l>scorers</th></tr>"
    )
    rows = []
    for t in report.tasks.values():
        rows.append(
            f"<tr><td class=l>{e(t.name)}</td><td>{t.score:.3f}</td><td>{t.n}</td>"
            f"<td{' class=bad' if t.errors else ''}>{t.errors}</td><td>{_pct(t.cut_off_rate)}</td>"
            f"<td>{_pct(t.cut_off_in_thinking_rate)}</td>"
            f"<td>{t.reasoning_chars_mean:.0f} / {t.reasoning_chars_p50:.0f}</td>"
            f"<td>{_num(t.reasoning_tokens_mean)} / {_num(t.reasoning_tokens_p50)}</td>"
            f"<td>{_num(t.completion_tokens_mean)}</td><td class=l>{e(', '.join(t.scorers))}</td></tr>"
        )
    sections = []
    for name in report.tasks:
        samples = sorted((s for s in report.samples if s.task == name), key=lambda s: s.score)
        items = []
        for s in samples:
            label = f"{s.id}: {s.score:.2f}" + (f" — error: {s.error}" if s.error else f" — {s.detail}")
            flags = " (cut off in thinking)" if s.cut_off_in_thinking else " (cut off)" if s.cut_off else ""
            items.append(f"<details><summary>{e(label + flags)}</summary><pre>{e(s.content)}</pre></details>")
        sections.append(f"<h2>{e(name)}</h2>{''.join(items)}")
    params = e(json.dumps(report.params, sort_keys=True))
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>qwenkit eval</title>"
        f"<style>{_CSS}</style></head><body><h1>qwenkit eval: {e(report.model)}</h1>"
        f"<p>endpoint {e(report.endpoint)} · mean score {report.score:.3f} · "
        f"{report.requests_sent} requests, "
        f"{report.answers_from_cache} answers from cache · {report.wall_s:.1f} s</p>"
        f"<p><code>{params}</code></p><table>{head}{''.join(rows)}</table>{''.join(sections)}</body></html>\n"
    )
