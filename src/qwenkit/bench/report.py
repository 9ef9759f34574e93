"""A benchmark's outputs: results.json, PNG plots, a self-contained report.html, and a rich table.

`check_out_dir` makes DIR and proves it writable before anything runs. `write_report` writes every file
through a temporary file renamed into place (no half-written results). Plots need matplotlib (the `plots`
extra, imported lazily with the Agg backend): throughput.png (output tok/s per level, one line per
endpoint) and latency.png (TTFT and ITL p50/p99 per level per endpoint); without it the JSON and HTML are
still written and `write_report` returns a one-line note saying how to get the plots.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from pathlib import Path

from rich import box
from rich.table import Table

from qwenkit.bench.run import BenchReport, LevelResult
from qwenkit.paths import atomic_write

PLOTS_HINT = "plots skipped: matplotlib is not installed (pip install 'qwenkit[plots]')"


def check_out_dir(out: Path) -> Path:
    """Create out (and parents) and check a file can be written there; ValueError naming the fix."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write to {out}: {exc.strerror or exc}; choose another --out") from None
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _level_name(report: BenchReport) -> str:
    return "req/s" if report.config.mode == "rate" else "concurrency"


def _x(lv: LevelResult) -> str:
    return f"{lv.request_rate:g}" if lv.request_rate is not None else str(lv.concurrency)


COLUMNS = (
    "endpoint",
    "level",
    "ok/\nfail",
    "tok/s",
    "req/s",
    "good\nreq/s",
    "TTFT ms\np50/p99",
    "ITL ms\np50/p99",
    "E2E ms\np50/p99",
    "gen\nCPU",
)


LEVEL, GOODPUT = 1, 5


def _row(lv: LevelResult) -> list[str]:
    return [
        lv.endpoint,
        _x(lv),
        f"{lv.completed}/{lv.failed}",
        f"{lv.output_tok_s:.0f}" if lv.output_tok_s >= 100 else f"{lv.output_tok_s:.1f}",
        f"{lv.request_throughput:.2f}",
        f"{lv.goodput:.2f}",
        f"{_ms(lv.ttft['p50'])}/{_ms(lv.ttft['p99'])}",
        f"{_ms(lv.itl['p50'])}/{_ms(lv.itl['p99'])}",
        f"{_ms(lv.e2e['p50'])}/{_ms(lv.e2e['p99'])}",
        f"{lv.client_cpu_share:.0%}",
    ]


def rich_table(report: BenchReport) -> Table:
    cfg = report.config
    table = Table(
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
        title=f"qwenkit bench: /v1/{'chat/completions' if cfg.endpoint == 'chat' else 'completions'}, "
        f"~{cfg.input_len} prompt tokens, {cfg.output_len} output tokens, {cfg.num_requests} requests x "
        f"{cfg.rounds} round(s) per level ({_level_name(report)})",
    )
    # Narrow enough for 80 columns: goodput only when an SLO makes it differ from req/s.
    keep = [i for i in range(len(COLUMNS)) if i != GOODPUT or cfg.slo_ttft or cfg.slo_itl]
    for i in keep:
        header = ("rate\nreq/s" if cfg.mode == "rate" else "conc") if i == LEVEL else COLUMNS[i]
        table.add_column(header, justify="left" if i == 0 else "right", no_wrap=True)
    for lv in report.levels:
        row = _row(lv)
        table.add_row(*(row[i] for i in keep))
    notes = [f"{lv.endpoint} @ {_x(lv)}: {lv.failures}" for lv in report.levels if lv.failures]
    notes = ["failures: " + "; ".join(notes)] if notes else []
    if silent := sum(lv.no_content for lv in report.levels):
        notes.append(f"{silent} completed streams carried no content: their TTFT is their first chunk")
    table.caption = "\n".join(notes) or None
    return table


def plots(report: BenchReport) -> dict[str, bytes] | None:
    """{file name: PNG bytes}, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xlabel = "request rate (req/s)" if report.config.mode == "rate" else "concurrent requests"
    xs = sorted({lv.x for lv in report.levels})
    by_endpoint = {e.label: [lv for lv in report.levels if lv.endpoint == e.label] for e in report.endpoints}
    out: dict[str, bytes] = {}

    def axis(ax: object) -> None:
        if len(xs) > 1 and xs[0] > 0 and xs[-1] / xs[0] >= 4:
            ax.set_xscale("log", base=2)  # type: ignore[attr-defined]
        ax.set_xticks(xs, [f"{x:g}" for x in xs])  # type: ignore[attr-defined]
        ax.set_xlabel(xlabel)  # type: ignore[attr-defined]
        ax.grid(True, alpha=0.3)  # type: ignore[attr-defined]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, lvs in by_endpoint.items():
        ax.plot([lv.x for lv in lvs], [lv.output_tok_s for lv in lvs], marker="o", label=label)
    axis(ax)
    ax.set_ylabel("output tokens/s (aggregate)")
    ax.set_title("Throughput")
    ax.legend()
    out["throughput.png"] = _png(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "ttft", "Time to first token"), (axes[1], "itl", "Inter-token latency")):
        for i, (label, lvs) in enumerate(by_endpoint.items()):
            color = f"C{i}"
            for q, style in (("p50", "-"), ("p99", "--")):
                ys = [(getattr(lv, key)[q] or float("nan")) * 1000 for lv in lvs]
                ax.plot([lv.x for lv in lvs], ys, style, marker="o", color=color, label=f"{label} {q}")
        axis(ax)
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out["latency.png"] = _png(fig)
    plt.close(fig)
    return out


def _png(fig: object) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)  # type: ignore[attr-defined]
    return buf.getvalue()


def render_html(report: BenchReport, images: dict[str, bytes] | None) -> str:
    """report.html: config, the table, failures, definitions, machine, and the plots inlined as base64."""
    e = html.escape
    cfg = report.config.model_dump(mode="json")
    head = "".join(
        f"<th>{e(c)}</th>" for c in (col.replace("/\n", "/").replace("\n", " ") for col in COLUMNS)
    )
    rows = "".join("<tr>" + "".join(f"<td>{e(v)}</td>" for v in _row(lv)) + "</tr>" for lv in report.levels)
    fails = [
        f"<li>{e(lv.endpoint)} @ {e(_x(lv))}: {e(str(lv.failures))}</li>"
        for lv in report.levels
        if lv.failures
    ]
    fails += [
        f"<li>{e(lv.endpoint)} @ {e(_x(lv))}: {lv.no_content} completed streams without content</li>"
        for lv in report.levels
        if lv.no_content
    ]
    endpoints = "".join(
        f"<li>{e(ep.label)}: {e(ep.url)}, model {e(ep.model)}, server {e(ep.server or '?')}</li>"
        for ep in report.endpoints
    )
    defs = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in report.definitions.items())
    kv = "".join(f"<li>{e(k)}: {e(str(v))}</li>" for k, v in {**report.machine, **report.versions}.items())
    conf = "".join(f"<li>{e(k)}: {e(str(v))}</li>" for k, v in cfg.items())
    if images:
        figs = "".join(
            f'<figure><img alt="{e(name)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
            f"</figure>"
            for name, data in images.items()
        )
    else:
        figs = f"<p>{e(PLOTS_HINT)}</p>"
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>qwenkit bench</title>"
        f"<style>{style}</style></head><body><h1>qwenkit bench</h1>"
        f"<p>{e(report.started_at)} to {e(report.finished_at)}</p><h2>Endpoints</h2><ul>{endpoints}</ul>"
        f"<h2>Results</h2><table><tr>{head}</tr>{rows}</table>"
        f"<h2>Failures and notes</h2><ul>{''.join(fails) or '<li>none</li>'}</ul>{figs}"
        f"<h2>Definitions</h2><ul>{defs}</ul><h2>Configuration</h2><ul>{conf}</ul>"
        f"<h2>Machine and versions</h2><ul>{kv}</ul></body></html>\n"
    )


def write_report(report: BenchReport, out: Path) -> tuple[list[Path], str | None]:
    """Write results.json, the PNGs and report.html into out; (paths written, a note or None)."""
    check_out_dir(out)
    images = plots(report)
    written = []
    for name, data in (images or {}).items():
        atomic_write(out / name, data)
        written.append(out / name)
    atomic_write(out / "results.json", (report.model_dump_json(indent=2) + "\n").encode())
    atomic_write(out / "report.html", render_html(report, images).encode())
    written += [out / "results.json", out / "report.html"]
    return written, None if images is not None else PLOTS_HINT
