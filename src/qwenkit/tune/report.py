"""A tune run's pictures: loss.png (train and eval loss per step) and report.html (settings, data, scores).

Contract: write_report(out, run) reads the run dict (as in run.json) and writes out/loss.png and
out/report.html atomically; without matplotlib only the HTML is written and the returned note says how to
get the plot. The HTML embeds the plot and escapes every value.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path
from typing import Any

from qwenkit.paths import atomic_write

PLOTS_HINT = "loss.png skipped: matplotlib is not installed (pip install 'qwenkit[plots]')"


def loss_png(train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> bytes | None:
    """The loss curves as PNG bytes, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", marker=".")
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(out: Path, run: dict[str, Any]) -> str | None:
    """Write loss.png and report.html into out; returns a note when the plot was skipped."""
    png = loss_png(
        [tuple(p) for p in run.get("train_loss", [])], [tuple(p) for p in run.get("eval_loss", [])]
    )
    if png is not None:
        atomic_write(out / "loss.png", png)
    e = html.escape
    rows = "".join(
        f"<tr><th>{e(str(k))}</th><td>{e(json.dumps(v) if not isinstance(v, str) else v)}</td></tr>"
        for section in ("data", "settings", "scores", "memory")
        for k, v in (run.get(section) or {}).items()
    )
    warnings = "".join(f"<li>{e(w)}</li>" for w in run.get("warnings", []))
    page = (
        "<!doctype html><meta charset='utf-8'><title>qwenkit tune report</title>"
        "<style>body{font-family:sans-serif;max-width:900px;margin:2em auto}"
        "th{text-align:left;padding-right:1em}"
        "</style>"
        f"<h1>qwenkit tune: {e(str(run.get('base_model', '')))}</h1>"
        f"<p>family {e(str(run.get('family', '')))}, {e(str(run.get('steps', 0)))} steps"
        f"{' (interrupted)' if run.get('interrupted') else ''}</p>"
        + (f"<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else "")
        + ("<h2>Loss</h2><img src='loss.png' alt='train and eval loss'>" if png is not None else "")
        + f"<h2>Run</h2><table>{rows}</table>"
    )
    atomic_write(out / "report.html", page)
    return None if png is not None else PLOTS_HINT
