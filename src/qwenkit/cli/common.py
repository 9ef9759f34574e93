"""Options and steps several commands share: which model to use, saying when it is the demo model, and
converting it for the engine with a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, get_args

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from qwenkit.checkpoints.demo import DEMO_NOTICE, ensure_default_demo, is_demo_checkpoint
from qwenkit.checkpoints.resolve import ResolvedModel, resolve_model
from qwenkit.cli.errors import err_console
from qwenkit.gguf.convert import OutType

if TYPE_CHECKING:
    from qwenkit.engines.loader import ModelFiles

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Local checkpoint dir, .gguf file, Hugging Face id (Qwen/Qwen3-0.6B) or modelscope:org/name. "
        "Default: the built-in demo model (random weights).",
    ),
]
QuantOption = Annotated[
    str, typer.Option("--quant", help="GGUF type an HF checkpoint is converted to: f32, f16, bf16, q8_0.")
]
AllowPickleOption = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Allow pickle .bin weights (they can run code when loaded)."),
]


def load_model(model: str | None, allow_pickle: bool = False) -> ResolvedModel:
    """Resolve --model; with none, create (once) and use the demo model, and say so on stderr."""
    ref = str(ensure_default_demo()) if model is None else model
    resolved = resolve_model(ref, allow_pickle=allow_pickle)
    if resolved.kind == "hf" and is_demo_checkpoint(resolved.path):
        err_console.print(f"[yellow]{DEMO_NOTICE}[/]", soft_wrap=True)
    return resolved


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """A transient rich progress bar on stderr; yields update(done, total)."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def check_quant(quant: str) -> OutType:
    """--quant for engines: the GGUF types a checkpoint converts to directly."""
    allowed = get_args(OutType)
    if quant not in allowed:
        raise ValueError(
            f"--quant must be one of {', '.join(allowed)} (got {quant!r}); use `qwenkit quantize` for others"
        )
    return quant  # type: ignore[return-value]


def open_model_files(model: str | None, allow_pickle: bool, quant: str) -> ModelFiles:
    """Resolve --model and make its GGUF (converted once, cached) and tokenizer ready for an engine."""
    from qwenkit.engines.loader import prepare_files  # llama.cpp loads only when a model is run

    outtype = check_quant(quant)
    resolved = load_model(model, allow_pickle)
    with progress_bar("converting to GGUF") as update:
        return prepare_files(resolved, outtype, progress=update)
