"""`qwenkit bench`: measure any OpenAI-compatible server (qwenkit serve, llama-server, vLLM, Ollama /v1).

Contract: bad options, an --out that cannot be written and an unreachable endpoint each stop the command
with one line and exit code 2 before any request is measured. Otherwise it runs the sweep with a progress
bar, prints a table, and writes results.json, the plots and report.html into --out (see qwenkit.bench).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from qwenkit.bench import BenchConfig, run_bench, write_report
from qwenkit.bench.report import check_out_dir, rich_table
from qwenkit.cli.common import progress_bar
from qwenkit.cli.errors import err_console, friendly_errors


def parse_levels(text: str, option: str, kind: type[int] | type[float]) -> list[float] | list[int]:
    """'1,4,16' -> [1, 4, 16]: positive numbers, each once, in order; ValueError naming the fix."""
    items = [item.strip() for item in text.split(",")]
    try:
        values = [kind(item) for item in items]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values) or len(set(values)) != len(values):
        example = "1,4,16" if kind is int else "0.5,2"
        raise ValueError(
            f"{option} must be distinct positive {'integers' if kind is int else 'numbers'} separated by "
            f"commas, e.g. {example} (got {text!r})"
        )
    return values


@friendly_errors
def bench_command(
    base_url: Annotated[
        str, typer.Option("--base-url", help="The server to measure, e.g. http://127.0.0.1:8000 (or .../v1).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for results.json, the plots and report.html.")],
    model: Annotated[
        str | None, typer.Option("--model", help="Model name to request (default: first id of /v1/models).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="QWENKIT_API_KEY", help="Bearer key for the server(s).")
    ] = None,
    concurrency: Annotated[
        str, typer.Option("--concurrency", help="Concurrent requests per level, closed loop: 1,4,16.")
    ] = "1,4,16",
    request_rate: Annotated[
        str | None,
        typer.Option(
            "--request-rate", help="Poisson arrivals at these requests/s instead of --concurrency: 0.5,2."
        ),
    ] = None,
    num_requests: Annotated[int, typer.Option("--num-requests", min=1, help="Requests per level.")] = 32,
    input_len: Annotated[int, typer.Option("--input-len", min=1, help="Prompt length, ~tokens.")] = 128,
    output_len: Annotated[int, typer.Option("--output-len", min=1, help="Tokens to generate.")] = 128,
    endpoint: Annotated[
        str, typer.Option("--endpoint", help="completions (/v1/completions) or chat (/v1/chat/completions).")
    ] = "completions",
    slo_ttft: Annotated[
        float | None, typer.Option("--slo-ttft", min=0.0, help="Goodput SLO: time to first token, seconds.")
    ] = None,
    slo_itl: Annotated[
        float | None, typer.Option("--slo-itl", min=0.0, help="Goodput SLO: mean inter-token gap, seconds.")
    ] = None,
    warmup: Annotated[
        int, typer.Option("--warmup", min=0, help="Uncounted requests per endpoint first.")
    ] = 2,
    rounds: Annotated[
        int, typer.Option("--rounds", min=1, help="Rounds per level, endpoints alternating; pooled.")
    ] = 1,
    compare: Annotated[
        list[str] | None,
        typer.Option("--compare", help="Another endpoint to measure alongside (repeat for more)."),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="Endpoint label, in URL order (repeat); default host:port."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the prompts and arrivals.")] = 0,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds one request may take.")
    ] = 600.0,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos/--no-ignore-eos", help="Ask for exactly --output-len tokens.")
    ] = True,
) -> None:
    """Measure TTFT, inter-token and end-to-end latency, tok/s and goodput of OpenAI-compatible servers."""
    if endpoint not in ("completions", "chat"):
        raise ValueError(f"--endpoint must be completions or chat (got {endpoint!r})")
    levels = parse_levels(concurrency, "--concurrency", int)
    rates = parse_levels(request_rate, "--request-rate", float) if request_rate is not None else None
    others = [u.strip() for item in compare or [] for u in item.split(",") if u.strip()]
    if len(label or []) > 1 + len(others):
        raise ValueError(f"--label given {len(label or [])} times for {1 + len(others)} URL(s): one per URL")
    config = BenchConfig(
        base_url=base_url,
        compare=others,
        labels=label or [],
        model=model,
        api_key=api_key,  # type: ignore[arg-type]
        endpoint=endpoint,  # type: ignore[arg-type]
        concurrency=levels,  # type: ignore[arg-type]
        request_rate=rates,  # type: ignore[arg-type]
        num_requests=num_requests,
        input_len=input_len,
        output_len=output_len,
        slo_ttft=slo_ttft or None,
        slo_itl=slo_itl or None,
        warmup=warmup,
        rounds=rounds,
        seed=seed,
        timeout=timeout,
        ignore_eos=ignore_eos,
    )
    check_out_dir(out)
    with progress_bar("benchmarking") as update:
        report = run_bench(config, progress=update)
    written, note = write_report(report, out)
    console = Console()
    console.print(rich_table(report))
    for path in written:
        console.print(f"wrote {path}", soft_wrap=True)
    if note:
        err_console.print(f"[yellow]{note}[/]", soft_wrap=True)
