"""`qwenkit demo ...`: the built-in random-weight checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from qwenkit.checkpoints.demo import DEMO_NOTICE, DemoArch, DemoSize, create_demo, default_demo_dir
from qwenkit.cli.errors import err_console, friendly_errors

app = typer.Typer(
    help="Built-in demo checkpoints (random weights, real Qwen architectures).", no_args_is_help=True
)


@app.command("create")
@friendly_errors
def create(
    arch: Annotated[DemoArch, typer.Option(help="Architecture (config model_type).")] = DemoArch.QWEN3,
    size: Annotated[
        DemoSize,
        typer.Option(
            help="tiny: tests and demos; small and the real shapes (0.5b, 1.5b for qwen2/qwen3; "
            "0.8b for qwen3_5/qwen3_5_moe): benchmarks. qwen2_5_vl / qwen3_vl: tiny, small."
        ),
    ] = DemoSize.TINY,
    out: Annotated[
        Path | None, typer.Option(help="Directory to write (default: the qwenkit cache).", file_okay=False)
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same files.")] = 0,
    embedding: Annotated[
        bool,
        typer.Option(
            "--embedding",
            help="An embedding model shaped like Qwen3-Embedding-0.6B (qwen3 only): `qwenkit serve` answers "
            "/v1/embeddings with it.",
        ),
    ] = False,
) -> None:
    """Write a random-weight checkpoint laid out like a Hugging Face hub download."""
    name = f"{arch.value}{'-embedding' if embedding else ''}-{size.value}"
    target = out if out is not None else default_demo_dir().parent / name
    with Console(stderr=True).status(f"writing {name} demo checkpoint"):
        path = create_demo(target, arch=arch, size=size, seed=seed, embedding=embedding)
    err_console.print(f"[yellow]{DEMO_NOTICE}[/]", soft_wrap=True)
    typer.echo(str(path))
