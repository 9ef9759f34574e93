"""`qwenkit fidelity`: KL divergence, top-1 agreement and perplexity of quantized GGUFs against a float one.

Contract: `qwenkit fidelity --reference REF.gguf CAND.gguf [CAND2.gguf ...]` runs qwenkit.evals.fidelity on
the given text (or the built-in one), prints a rich table on stdout and, with --out DIR, writes
DIR/fidelity.json. Bad input (different vocabularies, a text shorter than one window) is one line on
stderr, exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from qwenkit.cli.common import progress_bar
from qwenkit.cli.errors import err_console, friendly_errors
from qwenkit.evals.fidelity import FidelityConfig, FidelityReport, run_fidelity
from qwenkit.hardware import physical_cores


@friendly_errors
def fidelity_command(
    candidates: Annotated[
        list[Path], typer.Argument(metavar="CAND.gguf...", help="Quantized GGUFs of the reference's model.")
    ],
    reference: Annotated[
        Path,
        typer.Option("--reference", "-r", help="The f32/f16/bf16 GGUF the candidates are judged against."),
    ],
    text: Annotated[
        Path | None,
        typer.Option("--text", help="Plain-text file to score (default: a built-in English text)."),
    ] = None,
    ctx: Annotated[
        int, typer.Option("--ctx", min=64, help="Tokens per window; the second half is scored.")
    ] = 512,
    chunks: Annotated[
        int | None,
        typer.Option("--chunks", min=1, help="Windows to score (default: all of --text, 4 built-in)."),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads (default: physical cores).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the built-in text.")] = 0,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", file_okay=False, help="Write fidelity.json here.")
    ] = None,
) -> None:
    """Judge quantizations the way llama.cpp's perplexity --kl-divergence does: KL, top-1 agreement, PPL."""
    config = FidelityConfig(
        reference=reference,
        candidates=tuple(candidates),
        text=text,
        ctx=ctx,
        chunks=chunks,
        threads=threads or physical_cores(),
        seed=seed,
    )
    with progress_bar("scoring windows") as update:
        report = run_fidelity(config, progress=lambda what, done, total: update(done, total))
    console = Console()
    console.print(fidelity_table(report))
    if out is not None:
        path = report.write_json(out / "fidelity.json")
        err_console.print(f"[green]wrote[/] {path}", soft_wrap=True)


def fidelity_table(report: FidelityReport) -> Table:
    """The rich table of a FidelityReport."""
    table = Table(
        title=f"fidelity vs {report.reference.name}: {report.scored_tokens} tokens, "
        f"{report.windows} windows of {report.ctx} ({report.text_source})"
    )
    for col in ("model", "type", "MiB", "PPL", "PPL ratio", "KL mean", "KL p99", "KL max", "top-1 same"):
        table.add_column(col, justify="left" if col in ("model", "type") else "right")
    for v in report.variants:
        table.add_row(
            v.name + (" (ref)" if v.is_reference else ""),
            v.file_type,
            f"{v.size_bytes / 2**20:.1f}",
            f"{v.perplexity:.4g}",
            f"{v.ppl_ratio:.5f}",
            f"{v.kl_mean:.3g} ± {v.kl_stderr:.1g}",
            f"{v.kl_p99:.3g}",
            f"{v.kl_max:.3g}",
            f"{v.top1_agreement:.2%}",
        )
    return table
