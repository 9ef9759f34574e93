"""`qwenkit compare MODEL --formats f16,q8_0,q4_k_m,q4_0 --out DIR`: format × quality × speed, one report.

Contract: runs qwenkit.evals.compare.run_compare for MODEL (and --sizes) on this machine (probed as
`qwenkit select` probes it), prints a rich table and select's checked recommendation on stdout, and
writes DIR/compare.json, DIR/compare.html and, with matplotlib, the two PNG plots (else one line says
how to get them). Progress notes go to stderr; bad input is one line on stderr, exit code 2.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from qwenkit.cli.errors import err_console, friendly_errors
from qwenkit.cli.serve import split_list
from qwenkit.hardware import physical_cores


@friendly_errors
def compare_command(
    model: Annotated[
        str, typer.Argument(metavar="MODEL", help="A checkpoint directory (HF layout) or an f16/bf16 .gguf.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False, help="Folder for the report.")],
    formats: Annotated[
        str,
        typer.Option(
            "--formats", "-f", help="Comma-separated: f32, bf16, f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0."
        ),
    ] = "f16,q8_0,q4_k_m,q4_0",
    sizes: Annotated[
        str | None,
        typer.Option(
            "--sizes", help="More models of the family (dirs or GGUFs, comma-separated), same formats."
        ),
    ] = None,
    tasks: Annotated[
        str | None, typer.Option("--tasks", help="Eval tasks to score each variant on (see `qwenkit eval`).")
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: physical cores).")] = None,
    streams: Annotated[int, typer.Option("--streams", min=2, max=256, help="The multi-stream level.")] = 16,
    quick: Annotated[
        bool, typer.Option("--quick", help="Few short requests and one short fidelity window (a smoke run).")
    ] = False,
    min_agreement: Annotated[
        float, typer.Option("--min-agreement", min=0.01, max=1.0, help="Top-1 agreement a variant must keep.")
    ] = 0.9,
    prefer: Annotated[
        str, typer.Option("--prefer", help="select's preference: quality, latency or throughput.")
    ] = "quality",
    text: Annotated[
        Path | None, typer.Option("--text", help="Text file for fidelity (default: a built-in English text).")
    ] = None,
) -> None:
    """Serve MODEL in each format one at a time and report memory, tok/s, fidelity (and task scores)."""
    from qwenkit.catalog.schema import load_catalog
    from qwenkit.catalog.target import resolve_target
    from qwenkit.cli.plan import resolve_device, runtime_baseline
    from qwenkit.evals.compare import CompareConfig, run_compare
    from qwenkit.evals.compare_report import PLOTS_HINT, table_rows, write_report

    config = CompareConfig(
        models=(model, *split_list(sizes)),
        formats=split_list(formats),
        threads=threads or physical_cores(),
        streams=streams,
        tasks=split_list(tasks),
        quick=quick,
        min_agreement=min_agreement,
        prefer=prefer,
        fidelity_text=text,
    )
    # The machine as `qwenkit select` sees it, probed only once the arguments are known to be good.
    vocab = resolve_target(model, load_catalog()).shape.vocab
    config = replace(config, device=resolve_device(None, None, None), runtime=runtime_baseline(vocab))
    report = run_compare(config, say=lambda note: err_console.print(f"[dim]{note}[/]", highlight=False))
    head, rows = table_rows(report)
    table = Table(title=f"qwenkit compare ({config.threads} threads)")
    for col in head:
        table.add_column(col, justify="left" if col in ("model", "format") else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    for rec in report.recommendation or ():
        mark = "[green]confirmed[/]" if rec.confirmed else "[yellow]not confirmed[/]"
        console.print(f"{mark}: {rec.verdict}", highlight=False, soft_wrap=True)
    written = write_report(report, out)
    if not any(p.suffix == ".png" for p in written):
        err_console.print(f"[yellow]note:[/] {PLOTS_HINT}", soft_wrap=True)
    for path in written:
        err_console.print(f"[green]wrote[/] {path}", soft_wrap=True)
