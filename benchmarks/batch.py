"""`qwenkit batch` throughput vs the 16-stream `qwenkit serve` aggregate on the same model and threads
(issue 16, item 4: goal batch / server >= 0.9).

    python benchmarks/batch.py            # 64 prompts, the 0.5B-shape q4_0 demo, 2 threads, 16 streams
    python benchmarks/batch.py --quick    # tiny demo, 8 short prompts, 4 streams: checks the script runs

Each round runs both sides one after the other, never at once: (1) `qwenkit batch`'s own in-process
engine and runner (cli/batch.py native_engine + batch/run.py run_lines: the model opened with --max-seqs =
--streams, the lines submitted through the server's native path, the scheduler batching whatever is in
flight): --warmup lines, then --prompts /v1/completions lines, greedy, ignore_eos, --output-len tokens; its
tok/s is the measured lines' completion tokens over their run (model loading and warm-up excluded);
(2) `qwenkit serve` with --max-seqs = --streams on the same GGUF and --threads, measured by `qwenkit
bench`'s API (qwenkit.bench.run_bench) at --streams concurrency with the same number of requests, prompt
and output length (streaming completions, greedy, ignore_eos, --warmup requests first; its output tok/s
is tokens over the level's wall time). Both sides run at the same --poll (default 0). Prompts are plain
words, unique per request and side. Rounds are pooled by their median. Writes
benchmarks/results/batch-*.json and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

MODEL_NAME = "bench-model"


def batch_lines(args: argparse.Namespace, tag: str, n: int) -> list[Any]:
    """n /v1/completions batch lines (parsed as `qwenkit batch` parses its file), prompts unique per tag."""
    from qwenkit.batch.format import parse_batch
    from qwenkit.batch.run import NATIVE_ENDPOINTS
    from qwenkit.bench.prompts import builtin_text_maker

    make = builtin_text_maker()
    rows = []
    for i in range(n):
        body = {
            "model": MODEL_NAME,
            "prompt": make(f"batch-{args.seed}-{tag}-{i}", args.input_len),
            "max_tokens": args.output_len,
            "temperature": 0,
            "ignore_eos": True,
        }
        rows.append(
            json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body})
        )
    return parse_batch(("\n".join(rows) + "\n").encode(), tuple(NATIVE_ENDPOINTS))


def run_batch_side(args: argparse.Namespace, round_: int) -> dict[str, Any]:
    """`qwenkit batch`'s in-process engine and runner (its engine shut down when this returns): --warmup
    lines first, as the server side gets, then the measured ones."""
    from qwenkit.batch.run import run_lines
    from qwenkit.cli.batch import native_engine

    async def go() -> Any:
        engine_args = (
            str(args.model),
            args.streams,
            args.ctx_per_seq,
            args.threads,
            args.poll,
            "q8_0",
            False,
        )
        async with native_engine(*engine_args) as run:
            if args.warmup:
                await run_lines(
                    batch_lines(args, f"warm{round_}", args.warmup), run.execute, _drop, run.in_flight
                )
            out: list[dict[str, Any]] = []
            return await run_lines(
                batch_lines(args, str(round_), args.prompts), run.execute, out.append, run.in_flight
            )

    progress = asyncio.run(go())
    return {
        "output_tok_s": progress.tokens_per_s(),
        "completed": progress.succeeded,
        "failed": progress.failed,
        "output_tokens": progress.completion_tokens,
    }


def _drop(record: dict[str, Any]) -> None:
    pass


def run_server_side(args: argparse.Namespace, round_: int, log: Path) -> dict[str, Any]:
    """`qwenkit serve` started, measured at --streams concurrency by run_bench, stopped."""
    from serve import free_port, start, stop, wait_ready

    from qwenkit.bench import BenchConfig, run_bench

    port = free_port()
    exe = Path(sys.executable).parent / "qwenkit"
    cmd = [str(exe), "serve", "--model", str(args.model), "--port", str(port), "--threads", str(args.threads)]
    cmd += [
        "--max-seqs",
        str(args.streams),
        "--ctx",
        str(args.streams * args.ctx_per_seq),
        "--poll",
        args.poll,
    ]
    cmd += ["--served-model-name", MODEL_NAME]
    proc = start(cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}, log)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc)
        config = BenchConfig(
            base_url=f"http://127.0.0.1:{port}/v1",
            labels=["serve"],
            model=MODEL_NAME,
            endpoint="completions",
            concurrency=[args.streams],
            num_requests=args.prompts,
            input_len=args.input_len,
            output_len=args.output_len,
            warmup=args.warmup,
            rounds=1,
            seed=args.seed + round_,
        )
        level = run_bench(config).level("serve", concurrency=args.streams)
    finally:
        stop(proc)
    return {
        "output_tok_s": level.output_tok_s,
        "completed": level.completed,
        "failed": level.failed,
        "output_tokens": level.output_tokens,
        "command": cmd,
    }


def main(argv: list[str]) -> None:
    from common import bench_model, machine, median, write_results
    from rich.table import Table

    from qwenkit.paths import cache_root

    ap = argparse.ArgumentParser(prog="batch.py", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny demo, 8 short prompts, 4 streams")
    ap.add_argument("--model", type=Path, help="a GGUF (default: the 0.5B-shape q4_0 demo)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64, help="batch lines, and server requests per round")
    ap.add_argument("--streams", type=int, default=16, help="server concurrency = both sides' --max-seqs")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--ctx-per-seq", type=int, default=512, help="KV room per sequence (both sides)")
    ap.add_argument("--rounds", type=int, default=2, help="batch then server, this many times; medians")
    ap.add_argument("--warmup", type=int, default=2, help="server requests before the measured ones")
    ap.add_argument("--poll", default="0", help="both sides' --poll (0: idle threads sleep)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.streams, args.input_len, args.output_len = 8, 4, 16, 16
        args.rounds, args.warmup, args.ctx_per_seq = 1, 1, 128
    args.model = args.model or bench_model(
        *(("qwen3", "tiny", "q8_0") if args.quick else ("qwen2", "0.5b", "q4_0"))
    )
    name = "batch-quick" if args.quick else "batch"
    log = cache_root() / "bench" / "logs" / f"{name}-serve.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")

    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}: qwenkit batch ({args.prompts} prompts)", flush=True)
        batch = run_batch_side(args, r)
        print(f"round {r + 1}/{args.rounds}: qwenkit serve at {args.streams} streams", flush=True)
        server = run_server_side(args, r, log)
        rounds.append(
            {"batch": batch, "serve": server, "ratio": batch["output_tok_s"] / server["output_tok_s"]}
        )
    batch_tok_s = median([x["batch"]["output_tok_s"] for x in rounds])
    serve_tok_s = median([x["serve"]["output_tok_s"] for x in rounds])
    ratio = batch_tok_s / serve_tok_s
    version = subprocess.run([sys.executable, "-m", "qwenkit", "--version"], capture_output=True, text=True)
    payload = {
        "model": str(args.model),
        "threads": args.threads,
        "workload": {
            k: getattr(args, k)
            for k in (
                "prompts",
                "streams",
                "input_len",
                "output_len",
                "ctx_per_seq",
                "rounds",
                "warmup",
                "poll",
            )
        }
        | {"endpoint": "/v1/completions, greedy, ignore_eos"},
        "qwenkit": version.stdout.strip(),
        "machine": machine(),
        "rounds": rounds,
        "batch_output_tok_s": batch_tok_s,
        "serve_output_tok_s": serve_tok_s,
        "ratio": ratio,
        "goals": {"ratio_min": 0.9, "ratio_met": ratio >= 0.9},
        "serve_log": str(log),
    }
    table = Table(title=f"batch vs serve: {Path(args.model).name}, {args.threads} thr, {args.output_len} tok")
    table.add_column("round")
    table.add_column(f"qwenkit batch tok/s ({args.prompts} prompts)")
    table.add_column(f"serve tok/s ({args.streams} streams)")
    table.add_column("batch / serve")
    for i, x in enumerate(rounds, start=1):
        table.add_row(
            str(i),
            f"{x['batch']['output_tok_s']:.1f}",
            f"{x['serve']['output_tok_s']:.1f}",
            f"{x['ratio']:.2f}x",
        )
    table.add_row("median", f"{batch_tok_s:.1f}", f"{serve_tok_s:.1f}", f"{ratio:.2f}x")
    table.caption = f"goal: batch / serve >= 0.9 ({'met' if ratio >= 0.9 else 'not met'})"
    write_results(name, payload, table)


if __name__ == "__main__":
    main(sys.argv[1:])
