"""Options and steps several commands share: which model to use, saying when it is the demo model, and
converting it for the engine with a progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
from qwenkit.engines.llamacpp.config import KVType
from qwenkit.gguf.convert import OutType
from qwenkit.hardware import physical_cores

if TYPE_CHECKING:
    from qwenkit.engines.loader import ModelFiles
    from qwenkit.media import VisionSpec

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


FLASH_ATTN_CHOICES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def flash_attn_choice(value: str) -> bool | None:
    """--flash-attn auto|on|off as EngineConfig.flash_attn (None: llama.cpp's auto)."""
    if value not in FLASH_ATTN_CHOICES:
        raise ValueError(f"--flash-attn must be auto, on or off (got {value!r})")
    return FLASH_ATTN_CHOICES[value]


def check_kv(kv: str, flash_attn: str) -> tuple[KVType, bool | None]:
    """--kv and --flash-attn for the llama.cpp engine: (KV cache type, flash attention); a q8_0 cache only
    with flash attention (llama.cpp quantizes V only with it)."""
    allowed = get_args(KVType)
    if kv not in allowed:
        raise ValueError(f"--kv must be one of {', '.join(allowed)} (got {kv!r})")
    flash = flash_attn_choice(flash_attn)
    if kv == "q8_0" and flash is False:
        raise ValueError("--kv q8_0 needs flash attention: drop --flash-attn off")
    return kv, flash  # type: ignore[return-value]


KvOption = Annotated[
    str,
    typer.Option(
        "--kv", help="KV cache type: f16, f32 or q8_0 (half of f16's memory; needs flash attention)."
    ),
]
FlashAttnOption = Annotated[
    str,
    typer.Option(
        "--flash-attn",
        help="llama.cpp flash attention: auto (on where the backend has it, CPUs too), on or off.",
    ),
]

MmprojOption = Annotated[
    str | None,
    typer.Option(
        "--mmproj",
        help="Vision projector GGUF (mmproj-*.gguf) so the model reads images, or 'auto': convert the "
        "checkpoint's own vision tower. Default: text only.",
    ),
]


def open_model_files(
    model: str | None, allow_pickle: bool, quant: str, mmproj: str | None = None
) -> ModelFiles:
    """Resolve --model and make its GGUF (converted once, cached), tokenizer and (with --mmproj FILE or
    'auto') vision projector ready for an engine."""
    from pathlib import Path

    from qwenkit.engines.loader import prepare_files  # llama.cpp loads only when a model is run

    outtype = check_quant(quant)
    resolved = load_model(model, allow_pickle)
    projector = None if mmproj is None else "auto" if mmproj == "auto" else Path(mmproj)
    with progress_bar("converting to GGUF") as update:
        return prepare_files(resolved, outtype, progress=update, mmproj=projector)


def vision_spec(files: ModelFiles) -> VisionSpec | None:
    """The image grid of a model opened with a projector (None: text only)."""
    from qwenkit.media import VisionSpec

    return None if files.mmproj_path is None else VisionSpec.from_mmproj(files.mmproj_path)


PollOption = Annotated[
    str,
    typer.Option(
        "--poll",
        help="How long idle llama.cpp threads spin, 0-100 (0: sleep at once; 50: llama.cpp's default) or "
        "'auto': 50 while --threads follows the load; with --threads N, 0 when other processes load the CPU "
        "at start (spinning threads of two programs starve each other), else 50.",
    ),
]
THREADS_HELP = (
    "CPU threads (default: the physical cores, fewer while other processes keep them busy, down to 1)."
)


@dataclass(frozen=True)
class EngineThreads:
    """How the llama.cpp engine uses the CPU: EngineConfig's threads, poll and adapt_threads."""

    threads: int
    poll: int
    adapt: bool

    def config(self) -> dict[str, int | bool]:
        return {"threads": self.threads, "poll": self.poll, "adapt_threads": self.adapt}


def engine_threads(threads: int | None, poll: str, say_default: bool = True) -> EngineThreads:
    """--threads and --poll as the engine will run them; call before llama.cpp loads, so an OpenMP build's
    workers wait the way chosen. No --threads: the physical cores, fewer while other load lasts (the engine's
    ThreadGovernor; one thread has no workers to spin, so 'auto' polls at llama.cpp's default). --threads N:
    that many, and 'auto' measured now (said on stderr, or only when it turns polling off if not
    say_default)."""
    from qwenkit.engines.llamacpp.threads import DEFAULT_POLL, prepare_openmp, resolve_poll

    value = poll.strip().lower()
    if value != "auto" and not (value.isdigit() and 0 <= int(value) <= 100):
        raise ValueError(f"--poll must be 'auto' or a level 0-100 (got {poll!r})")
    adapt = threads is None
    count = threads or physical_cores()
    if value == "auto" and adapt:
        level = DEFAULT_POLL
    else:
        level, why = resolve_poll("auto" if value == "auto" else int(value), count)
        if value == "auto" and (say_default or level == 0):
            err_console.print(f"[dim]--poll auto: {why}[/]", soft_wrap=True)
    prepare_openmp(level)
    return EngineThreads(count, level, adapt)
