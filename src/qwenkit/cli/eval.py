"""`qwenkit eval`: thinking-aware quality of a model or of any OpenAI-compatible server, on built-in
synthetic tasks, a JSONL file, or local GSM8K / MMLU / HumanEval files.

Contract: a thin wrapper over qwenkit.evals.run_eval: options -> EvalConfig, a rich progress bar, a summary
table on stdout (score, n, errors, cut-off rates, reasoning length per task) and the report paths. Bad
input (unknown task, malformed line, unreachable endpoint) is one line on stderr, exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from qwenkit.cli.common import load_model, progress_bar
from qwenkit.cli.errors import err_console, friendly_errors
from qwenkit.cli.serve import split_list
from qwenkit.evals import EvalConfig, EvalReport, run_eval
from qwenkit.evals.tasks import LOADERS, SYNTHETIC

TASKS_HELP = (
    f"Comma-separated tasks: built-in {', '.join(SYNTHETIC)} (generated from --seed, no download), or files "
    f"{', '.join(f'{k}:PATH' for k in LOADERS)}. Default: all built-in tasks (or only --data when given)."
)


def print_summary(report: EvalReport, console: Console) -> None:
    table = Table(title=f"qwenkit eval: {report.model}", title_justify="left")
    for column in ("task", "score", "n", "errors", "cut off", "in thinking", "reasoning chars p50"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for t in report.tasks.values():
        table.add_row(
            t.name,
            f"{t.score:.3f}",
            str(t.n),
            f"[red]{t.errors}[/]" if t.errors else "0",
            f"{100 * t.cut_off_rate:.0f}%",
            f"{100 * t.cut_off_in_thinking_rate:.0f}%",
            f"{t.reasoning_chars_p50:.0f}",
        )
    console.print(table)
    console.print(
        f"{report.requests_sent} requests, {report.answers_from_cache} answers from cache, "
        f"{report.wall_s:.1f} s"
    )


@friendly_errors
def eval_command(
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Run this model here (checkpoint dir, .gguf, hub id) behind qwenkit serve."
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option("--base-url", help="An OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1."),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="OPENAI_API_KEY", help="The server's API key.")
    ] = None,
    served_model: Annotated[
        str | None, typer.Option("--served-model", help="Model name to ask (default: the server's first).")
    ] = None,
    tasks: Annotated[str | None, typer.Option("--tasks", help=TASKS_HELP)] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="A JSONL file of cases (scored numeric-or-exact unless a line names a scorer)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="At most N cases per task.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the built-in tasks and of sampling.")] = 0,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, max=256, help="Requests in flight.")
    ] = 4,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Tokens per answer, reasoning included.")
    ] = 1024,
    thinking: Annotated[
        bool | None,
        typer.Option("--thinking/--no-thinking", help="Turn thinking on or off (default: the server's)."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write eval.json and eval.html here.")] = None,
    no_cache: Annotated[
        bool,
        typer.Option("--no-cache", help="Ask everything again (answers are cached and resumed otherwise)."),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="CPU threads for --model (default: physical cores)."),
    ] = None,
    quant: Annotated[
        str, typer.Option("--quant", help="GGUF type an HF checkpoint is converted to (--model).")
    ] = "q8_0",
) -> None:
    """Score a model's answers (reasoning split off) on synthetic or local tasks; JSON + HTML report."""
    if model is None and base_url is None:
        raise ValueError("give --model (run a model here) or --base-url (an OpenAI-compatible server)")
    if model is not None and base_url is not None:
        raise ValueError("give --model or --base-url, not both")
    if data is not None and not data.is_file():
        raise ValueError(f"--data {data}: no such file")
    if model is not None:
        model = str(load_model(model).path)  # resolved once here; says so when it is the demo model
    config = EvalConfig(
        model=model,
        base_url=base_url,
        api_key=api_key,  # type: ignore[arg-type]
        served_model=served_model,
        tasks=list(split_list(tasks)),
        data=data,
        limit=limit,
        seed=seed,
        concurrency=concurrency,
        max_tokens=max_tokens,
        thinking=thinking,
        out=out,
        cache=not no_cache,
        threads=threads,
        quant=quant,
    )
    with progress_bar("evaluating") as update:
        report = run_eval(config, progress=update)
    print_summary(report, Console())
    if out is not None:
        err_console.print(f"report: {out / 'eval.json'}, {out / 'eval.html'}")
