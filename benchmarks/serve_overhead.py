"""Where a server's CPU goes per streamed token, at one stream (issue 12: the 1-stream gap to llama-server).

    python benchmarks/serve_overhead.py            # qwenkit serve and llama-server, 0.5B-shape q4_0
    python benchmarks/serve_overhead.py --quick    # tiny demo, qwenkit only: checks the script runs

Starts each server alone on the same GGUF and threads (peers.py's commands), streams --requests greedy
/v1/completions of --tokens tokens one after another (qwenkit bench's raw-socket client), and reads every
thread's exact run time and context switches from /proc/PID/task/*/{schedstat,status} before and after.
Per token it reports the decode threads (the --threads busiest) and everything else the server ran (HTTP,
event loop, wake-ups): on a machine whose cores all decode, that rest is taken from the decode, so it is
the cost of serving a token. Linux only. Writes benchmarks/results/serve-overhead-*.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import children
from common import bench_model, machine, write_results
from peers import MODEL_NAME, add_extra_word_options, server_commands
from rich.table import Table
from serve import free_port, wait_ready

from qwenkit.bench.client import Endpoint, stream_request


def stream(port: int, i: int, tokens: int) -> float:
    """One streaming completion through qwenkit bench's raw-socket client; decode tok/s between its first and
    last content chunk as the client sees them."""
    payload = {
        "model": MODEL_NAME,
        "prompt": f"Request {i}: tell me a long story about the number {i * 7919}",
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    record = asyncio.run(
        stream_request(Endpoint.parse(f"http://127.0.0.1:{port}"), "/v1/completions", payload)
    )
    if record.error is not None:
        raise RuntimeError(f"request {i} failed: {record.error} {record.detail or ''}")
    times = record.chunk_times
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def threads(pid: int) -> dict[str, tuple[int, int, int]]:
    """Per thread: run time (ns), voluntary and involuntary context switches."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            run_ns = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended in between
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        out[tid] = (run_ns, int(fields["voluntary_ctxt_switches"]), int(fields["nonvoluntary_ctxt_switches"]))
    return out


def measure(cmd: list[str], health: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    proc = children.start(cmd)
    try:
        wait_ready(f"http://127.0.0.1:{port}{health}", proc)
        for i in range(2):
            stream(port, 10_000 + i, args.tokens)  # warm-up
        before = threads(proc.pid)
        speeds = [stream(port, i, args.tokens) for i in range(args.requests)]
        after = threads(proc.pid)
    finally:
        children.stop(proc)
    n = args.requests * args.tokens
    per: list[tuple[float, float, float]] = []  # µs, voluntary, involuntary switches per token
    for tid, (run, vol, inv) in after.items():
        run0, vol0, inv0 = before.get(tid, (0, 0, 0))
        per.append(((run - run0) / 1e3 / n, (vol - vol0) / n, (inv - inv0) / n))
    per.sort(reverse=True)
    decode, rest = per[: args.threads], per[args.threads :]
    return {
        "tok_s": statistics.median(speeds),
        "decode_us_per_token": sum(p[0] for p in decode),
        "decode_involuntary_per_token": sum(p[2] for p in decode),
        "other_us_per_token": sum(p[0] for p in rest),
        "other_switches_per_token": sum(p[1] + p[2] for p in rest),
        "threads": [
            {"us": round(p[0], 1), "voluntary": round(p[1], 2), "involuntary": round(p[2], 2)} for p in per
        ],
        "command": cmd,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny demo, qwenkit only, few tokens")
    ap.add_argument("--model", type=Path, help="a GGUF (default: the 0.5B-shape q4_0 demo)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--sides", default="qwenkit,llama_server")
    add_extra_word_options(ap)
    args = ap.parse_args()
    if not Path("/proc/self/task").is_dir():
        sys.exit("serve_overhead.py reads /proc/PID/task: it runs on Linux only")
    if args.quick:
        args.sides, args.requests, args.tokens = "qwenkit", 2, 16
    args.model = args.model or bench_model(
        *(("qwen3", "tiny", "q8_0") if args.quick else ("qwen2", "0.5b", "q4_0"))
    )
    # peers.py's commands, one slot layout for all: 16 slots of 512 cells.
    args.concurrency, args.ctx_per_seq = [16], 512
    args.sides = args.sides.split(",")
    ports = {side: free_port() for side in args.sides}
    results = {}
    for side, (cmd, health) in server_commands(args, ports).items():
        results[side] = measure(cmd, health, ports[side], args)
    table = Table(title=f"per streamed token, 1 stream: {args.model.name}, {args.threads} threads")
    for col in ("server", "tok/s", "decode threads µs", "rest µs", "rest switches", "decode preempted"):
        table.add_column(col)
    for side, r in results.items():
        table.add_row(
            side,
            f"{r['tok_s']:.2f}",
            f"{r['decode_us_per_token']:.0f}",
            f"{r['other_us_per_token']:.0f}",
            f"{r['other_switches_per_token']:.2f}",
            f"{r['decode_involuntary_per_token']:.2f}",
        )
    payload = {"machine": machine(), "model": str(args.model), "tokens": args.tokens, "results": results}
    write_results("serve-overhead-quick" if args.quick else "serve-overhead", payload, table)


if __name__ == "__main__":
    main()
