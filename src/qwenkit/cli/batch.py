"""`qwenkit batch IN.jsonl OUT.jsonl`: run an OpenAI Batch file on the in-process engine or a server.

IN is OpenAI's batch input format (custom_id, method, url, body per line; urls /v1/chat/completions,
/v1/completions, /v1/responses). In-process, every request goes through the server's own native path
(batch/run.py) on one engine that decodes --max-seqs requests together, and runs on --model whatever model
a line names; with --base-url the lines are POSTed to that server, --concurrency at a time. OUT gets one
line per input in OpenAI's batch output shape, appended as each finishes; a rerun skips the custom_ids
already in OUT (a torn last line from a crash is dropped and that request runs again). A file that is not
JSONL or repeats a custom_id is refused before anything runs; a bad line becomes that line's error.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qwenkit.batch.format import BatchLine, ResultFile, parse_batch
from qwenkit.batch.run import (
    NATIVE_ENDPOINTS,
    BatchInterrupted,
    Executor,
    HTTPExecutor,
    NativeExecutor,
    run_lines,
)
from qwenkit.batch.run import Progress as BatchProgress
from qwenkit.checkpoints.demo import DEMO_NOTICE
from qwenkit.cli.common import (
    THREADS_HELP,
    AllowPickleOption,
    ModelOption,
    PollOption,
    QuantOption,
    engine_threads,
    open_model_files,
)
from qwenkit.cli.errors import err_console, fail, friendly_errors
from qwenkit.cli.serve import API_KEY_ENV, DEFAULT_CTX

DEFAULT_MAX_SEQS = 8
DEFAULT_CONCURRENCY = 16
HTTP_TIMEOUT_S = 600.0


def _progress_bar() -> Progress:
    return Progress(
        TextColumn("batch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    )


async def _run(
    todo: list[BatchLine], total: int, out: ResultFile, execute: Executor, concurrency: int
) -> BatchProgress:
    with _progress_bar() as bar:
        task = bar.add_task("batch", total=total, completed=total - len(todo), rate="")

        def show(p: BatchProgress) -> None:
            bar.update(task, completed=total - len(todo) + p.done, rate=f"{p.tokens_per_s():.1f} tok/s")

        return await run_lines(todo, execute, out.append, concurrency, on_progress=show)


@dataclass
class NativeRun:
    """The in-process engine of `qwenkit batch`: what runs the lines, and how many to keep in flight."""

    execute: NativeExecutor
    in_flight: int
    name: str
    is_demo: bool


@asynccontextmanager
async def native_engine(
    model: str | None,
    max_seqs: int,
    ctx_tokens: int | None,
    threads: int | None,
    poll: str,
    quant: str,
    allow_pickle: bool,
) -> AsyncIterator[NativeRun]:
    """Open --model on an engine decoding `max_seqs` together, behind the server's native path; every line
    runs on this model whatever model it names (the file may have been written for another)."""
    cpu = engine_threads(threads, poll, say_default=False)  # before llama.cpp loads
    from qwenkit.engines.llamacpp.config import EngineConfig
    from qwenkit.engines.loader import open_engine  # llama.cpp loads only when a model is run
    from qwenkit.serve.app import create_app, serve_context

    files = open_model_files(model, allow_pickle, quant)
    # Twice as many in flight as run: a finished slot is refilled at once, so every step has a full batch.
    # All of them may wait at once (submitted before a step admits any), so the queue takes them all.
    in_flight = 2 * max_seqs
    config = EngineConfig.for_workload(
        max_seqs,
        ctx_tokens or DEFAULT_CTX,
        files.n_ctx_train,
        max_waiting=in_flight,
        **cpu.config(),
    )
    engine = open_engine(files, config)
    app = create_app(engine, files.tokenizer, files.family, files.name, embedding=files.embedding)
    ctx = serve_context(app)
    engine.start()
    try:
        yield NativeRun(NativeExecutor(ctx, override_model=True), in_flight, files.name, files.is_demo)
    finally:
        await asyncio.to_thread(engine.shutdown, 5.0)


async def _run_native(
    todo: list[BatchLine], total: int, out: ResultFile, *engine_args: Any
) -> tuple[BatchProgress, str, bool]:
    async with native_engine(*engine_args) as run:
        progress = await _run(todo, total, out, run.execute, run.in_flight)
    return progress, run.name, run.is_demo


@friendly_errors
def batch_command(
    input_path: Annotated[
        Path, typer.Argument(metavar="IN", exists=True, dir_okay=False, help="OpenAI batch input (JSONL).")
    ],
    output_path: Annotated[
        Path, typer.Argument(metavar="OUT", dir_okay=False, help="Output JSONL (appended; resumed).")
    ],
    model: ModelOption = None,
    base_url: Annotated[
        str | None,
        typer.Option("--base-url", help="Send the lines to this server (e.g. http://127.0.0.1:8000/v1)."),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar=API_KEY_ENV, help="The server's API key (--base-url).")
    ] = None,
    max_seqs: Annotated[
        int | None,
        typer.Option("--max-seqs", min=1, max=256, help="Requests decoded together in-process (default 8)."),
    ] = None,
    threads: Annotated[int | None, typer.Option(min=1, help=THREADS_HELP)] = None,
    ctx: Annotated[
        int | None,
        typer.Option("--ctx", min=64, help="Tokens per request, prompt plus answer (default 4096)."),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", min=1, max=1024, help="Requests in flight with --base-url (default 16)."
        ),
    ] = None,
    poll: PollOption = "auto",
    quant: QuantOption = "q8_0",
    allow_pickle: AllowPickleOption = False,
) -> None:
    """Run an OpenAI Batch file (IN) into OUT: in-process with continuous batching, or against a server."""
    if base_url is not None:
        engine_flags = {"--model": model, "--max-seqs": max_seqs, "--threads": threads, "--ctx": ctx}
        given = [flag for flag, value in engine_flags.items() if value is not None]
        if given:
            raise fail(
                f"{given[0]} sets up the in-process engine; drop it with --base-url (the server's applies)"
            )
    elif concurrency is not None:
        raise fail("--concurrency applies with --base-url; in-process, set --max-seqs")
    if output_path.resolve() == input_path.resolve():
        raise fail("OUT must be another file than IN")
    lines = parse_batch(input_path.read_bytes(), tuple(NATIVE_ENDPOINTS), name=str(input_path))
    with ResultFile(output_path) as out:
        done = out.open()
        if done.torn:
            err_console.print(f"[yellow]note:[/] dropped a torn last line of {output_path} (it runs again)")
        todo = [line for line in lines if not done.has(line)]
        if not todo:
            err_console.print(f"all {len(lines)} requests are already in {output_path}")
            return
        if len(todo) < len(lines):
            err_console.print(f"resuming: {len(lines) - len(todo)} of {len(lines)} requests already in OUT")
        name, is_demo = base_url or "", False
        try:
            if base_url is None:
                progress, name, is_demo = asyncio.run(
                    _run_native(
                        todo,
                        len(lines),
                        out,
                        model,
                        max_seqs or DEFAULT_MAX_SEQS,
                        ctx,
                        threads,
                        poll,
                        quant,
                        allow_pickle,
                    )
                )
            else:
                progress = asyncio.run(_run_remote(todo, len(lines), out, base_url, api_key, concurrency))
        except BatchInterrupted as exc:
            raise fail(
                f"stopped: {exc}; the finished requests are in {output_path}, rerun to resume"
            ) from None
    rate = progress.tokens_per_s()
    err_console.print(
        f"{progress.done} requests on {name}: {progress.succeeded} ok, {progress.failed} failed; "
        f"{progress.completion_tokens} tokens at {rate:.1f} tok/s → {output_path}",
        soft_wrap=True,
    )
    if is_demo:
        err_console.print(f"[yellow]{DEMO_NOTICE}[/]", soft_wrap=True)


async def _run_remote(
    todo: list[BatchLine],
    total: int,
    out: ResultFile,
    base_url: str,
    api_key: str | None,
    concurrency: int | None,
) -> BatchProgress:
    headers: dict[str, Any] = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = concurrency or DEFAULT_CONCURRENCY
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(headers=headers, timeout=HTTP_TIMEOUT_S, limits=limits) as client:
        return await _run(todo, total, out, HTTPExecutor(client, base_url), limit)
