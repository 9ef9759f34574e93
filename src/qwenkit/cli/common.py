"""Options and steps several commands share: which model to use, and saying when it is the demo model."""

from __future__ import annotations

from typing import Annotated

import typer

from qwenkit.checkpoints.demo import DEMO_NOTICE, ensure_default_demo, is_demo_checkpoint
from qwenkit.checkpoints.resolve import ResolvedModel, resolve_model
from qwenkit.cli.errors import err_console

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Local checkpoint dir, .gguf file, Hugging Face id (Qwen/Qwen3-0.6B) or modelscope:org/name. "
        "Default: the built-in demo model (random weights).",
    ),
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
