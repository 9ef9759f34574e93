"""`qwenkit convert` (HF checkpoint → GGUF) and `qwenkit quantize` (GGUF → smaller GGUF via llama.cpp).

Both print the written path on stdout and a one-line summary plus a rich progress display on stderr. The
GGUF modules are imported when a command runs, so the rest of the CLI works without the cpu extra.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import (
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from qwenkit.checkpoints.resolve import ResolvedModel
from qwenkit.cli.common import ModelOption, load_model, progress_bar
from qwenkit.cli.errors import err_console, friendly_errors

if TYPE_CHECKING:
    from qwenkit.gguf.reader import GGUFInfo


class OutTypeChoice(StrEnum):
    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"


class QuantChoice(StrEnum):
    Q4_0 = "q4_0"
    Q4_K_M = "q4_k_m"
    Q5_K_M = "q5_k_m"
    Q6_K = "q6_k"
    Q8_0 = "q8_0"


OutOption = Annotated[
    Path | None,
    typer.Option("--out", "-o", dir_okay=False, help="GGUF file to write (default: ./<model>-<type>.gguf)."),
]


@friendly_errors
def convert_command(
    model: ModelOption = None,
    outtype: Annotated[
        OutTypeChoice,
        typer.Option(
            "--outtype", "-t", help="Weight type; norms and biases stay f32 (smaller: qwenkit quantize)."
        ),
    ] = OutTypeChoice.Q8_0,
    out: OutOption = None,
) -> None:
    """Convert a Hugging Face Qwen checkpoint (qwen2/3, their _moe, qwen3_5/3_5_moe, qwen3_next) to GGUF."""
    _require("gguf")
    from qwenkit.gguf.convert import checkpoint_name
    from qwenkit.gguf.reader import read_gguf_info

    resolved = _checkpoint(load_model(model))
    target = out if out is not None else Path.cwd() / f"{checkpoint_name(resolved.path)}-{outtype.value}.gguf"
    _convert(resolved.path, target, outtype.value)
    _report(read_gguf_info(target))


@friendly_errors
def quantize_command(
    src: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="An f32/f16/bf16 .gguf, or a checkpoint (local dir, org/name) to convert to bf16 first.",
        ),
    ],
    qtype: Annotated[
        QuantChoice,
        typer.Option("--qtype", "-q", help="llama.cpp quantization (k-quants need 256-wide rows)."),
    ] = QuantChoice.Q4_K_M,
    out: OutOption = None,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="Threads for llama.cpp (default: all cores).")
    ] = None,
) -> None:
    """Quantize a Qwen GGUF (or a checkpoint, converted on the way) with llama.cpp's quantizer."""
    _require("gguf", "llama_cpp")
    from qwenkit.gguf.convert import checkpoint_name
    from qwenkit.gguf.reader import read_gguf_info

    resolved = load_model(src)
    threads = threads if threads is not None else (os.cpu_count() or 1)
    if resolved.kind == "gguf":
        target = out if out is not None else _quantized_name(resolved.path, qtype.value)
        _quantize(resolved.path, target, qtype.value, threads)
    else:
        target = (
            out if out is not None else Path.cwd() / f"{checkpoint_name(resolved.path)}-{qtype.value}.gguf"
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        # The bf16 intermediate is as big as the checkpoint: keep it beside the output, then delete it.
        with tempfile.TemporaryDirectory(prefix=".qwenkit-", dir=target.parent) as scratch:
            float_gguf = Path(scratch) / "model-bf16.gguf"
            _convert(resolved.path, float_gguf, "bf16")
            _quantize(float_gguf, target, qtype.value, threads)
    _report(read_gguf_info(target))


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"this command needs {', '.join(missing)}: pip install 'qwenkit[cpu]'")


def _checkpoint(resolved: ResolvedModel) -> ResolvedModel:
    if resolved.kind == "gguf":
        raise ValueError(f"{resolved.path} is already a GGUF: use `qwenkit quantize` to make it smaller")
    return resolved


def _quantized_name(src: Path, qtype: str) -> Path:
    stem = src.stem
    for suffix in [*(f"-{t.value}" for t in OutTypeChoice), *(f"-{t.value}" for t in QuantChoice)]:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return src.with_name(f"{stem}-{qtype}.gguf")


def _convert(checkpoint: Path, target: Path, outtype: str) -> None:
    from qwenkit.gguf.convert import convert_to_gguf

    with progress_bar(f"converting to {outtype} tensors") as update:
        convert_to_gguf(checkpoint, target, outtype, progress=update, note=_note)  # type: ignore[arg-type]


def _note(text: str) -> None:
    err_console.print(f"[yellow]note:[/] {text}", soft_wrap=True)


def _quantize(src: Path, target: Path, qtype: str, threads: int) -> None:
    from qwenkit.gguf.quantize import quantize_gguf

    columns = (SpinnerColumn(), TextColumn(f"quantizing to {qtype} with llama.cpp ({threads} threads)"))
    with Progress(*columns, TimeElapsedColumn(), console=err_console, transient=True) as progress:
        progress.add_task("quantize", total=None)
        quantize_gguf(src, target, qtype, threads=threads)  # type: ignore[arg-type]


def _report(info: GGUFInfo) -> None:
    types = ", ".join(f"{count} {name}" for name, count in sorted(info.tensor_types.items()))
    err_console.print(
        f"[green]wrote[/] {info.path} ({info.architecture}, {info.file_type_name}, "
        f"{info.size_bytes / 2**20:.1f} MiB; tensors: {types})",
        soft_wrap=True,
    )
    typer.echo(str(info.path))
