"""Decode speed when another program keeps the same cores busy (issue 12: worker polling).

    python benchmarks/contention.py            # Qwen2.5-0.5B shape, q4_0, 2 threads, 128 tokens
    python benchmarks/contention.py --quick    # tiny demo, 32 tokens, busy-loop load only: a smoke run

Single-stream greedy decode tok/s through qwenkit's engine (EOS ignored), each measurement a fresh process
(an OpenMP build's wait policy is fixed when llama.cpp loads), for --poll 50 (llama.cpp's default), 0
(workers sleep at once) and auto (threads.py decides from /proc/stat at start), all on --threads, and
adapt: the CLI's default (no --threads: at most --threads here, fewer while other processes keep the cores
busy, re-measured every 0.5 s by threads.ThreadGovernor; --poll auto); quiet, then under load:
`cpu`: one `python -c` busy loop per CPU; `llama`: a second llama.cpp process decoding without end at
llama.cpp's default polling on the same threads (the case the issue measured: 0.4 vs 60 tok/s). A run
that collapses is cut at --deadline seconds and scored by the tokens it made. Settings alternate within a
round; the best round is kept (the machine is shared). Ratio = loaded / quiet per setting and load;
goal: adapt (the default) >= 0.4. Writes benchmarks/results/contention-*.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from children import start, stop
from common import bench_model, machine, write_results

GOAL = 0.4
SETTINGS = ("50", "0", "auto", "adapt")
PROMPT = [1000 + (j * 104729) % 100000 for j in range(32)]


def decode_speed(model: Path, threads: int, poll: str, tokens: int, deadline: float) -> dict[str, Any]:
    """In this (fresh) process: --threads/--poll resolved the way the CLI does it (poll "adapt": no
    --threads and --poll auto, at most `threads`), then one greedy stream timed."""
    import dataclasses

    from qwenkit.cli.common import engine_threads

    adapt = poll == "adapt"
    cpu = engine_threads(None if adapt else threads, "auto" if adapt else poll)  # before llama.cpp loads
    cpu = dataclasses.replace(cpu, threads=threads)
    from qwenkit.engines.llamacpp.config import EngineConfig
    from qwenkit.engines.llamacpp.engine import LlamaCppEngine
    from qwenkit.engines.request import GenerationRequest, TokenEvent
    from qwenkit.engines.sampling import SamplingParams

    engine = LlamaCppEngine(model, EngineConfig(n_ctx=512, max_seqs=1, **cpu.config()))
    engine.start()
    times: list[float] = []
    done = threading.Event()

    def on(ev: TokenEvent) -> None:
        times.extend([time.perf_counter()] * len(ev.token_ids))
        if ev.finished:
            done.set()

    try:
        params = SamplingParams(temperature=0.0, max_tokens=tokens)
        engine.submit(GenerationRequest("c", tuple(PROMPT), params, ignore_eos=True), on)
        finished = done.wait(deadline)
        end = times[-1] if finished else time.perf_counter()
        if not finished:
            engine.abort("c")
            done.wait(30)
        threads_end = engine.stats().threads
    finally:
        engine.shutdown(timeout=5)
    made = len(times)
    # From the first token (prefill excluded) to the last, or to the deadline when cut off.
    rate = (made - 1) / (end - times[0]) if made >= 2 else 0.0
    level = f"{cpu.poll}, {threads_end} thr" if adapt else str(cpu.poll)
    return {"poll": poll, "level": level, "tok_s": rate, "tokens": made, "cut_off": not finished}


def hog(model: Path, threads: int) -> None:
    """A second llama.cpp program: decode at llama.cpp's default polling until killed."""
    from qwenkit.engines.llamacpp.config import EngineConfig
    from qwenkit.engines.llamacpp.model import LlamaModel

    lm = LlamaModel(model, EngineConfig(n_ctx=512, max_seqs=1, threads=threads))
    pos = 0
    while True:
        if pos >= 500:
            lm.clear_memory()
            pos = 0
        lm.decode([1234], [pos], [0], [True])
        pos += 1


def start_load(kind: str, args: argparse.Namespace) -> list[subprocess.Popen[bytes]]:
    if kind == "cpu":
        n = os.cpu_count() or 1
        procs = [start([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    else:
        cmd = [sys.executable, __file__, "--hog", "--model", str(args.model), "--threads", str(args.threads)]
        procs = [start(cmd)]
    time.sleep(args.settle)
    for p in procs:
        if p.poll() is not None:
            raise RuntimeError(f"the {kind} load exited early ({p.returncode})")
    return procs


def measure(poll: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--poll", poll, "--model", str(args.model)]
    cmd += ["--threads", str(args.threads), "--tokens", str(args.tokens), "--deadline", str(args.deadline)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.deadline + 300)
    if done.returncode != 0:
        raise RuntimeError(f"measurement --poll {poll} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny demo, 32 tokens, cpu load only")
    ap.add_argument("--model", type=Path, help="a GGUF (default: the 0.5B-shape q4_0 demo)")
    ap.add_argument("--threads", type=int, default=2, help="threads (adapt: at most)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--deadline", type=float, default=60.0, help="seconds before a collapsed run is cut")
    ap.add_argument("--loads", default="cpu,llama", help="cpu (busy loops), llama (a second decoder)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="--poll values to compare, and adapt")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, best kept")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds the load runs before measuring")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hog", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--poll", default="50", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = decode_speed(args.model, args.threads, args.poll, args.tokens, args.deadline)
        print(json.dumps(result))
        return
    if args.hog:
        hog(args.model, args.threads)
        return
    if args.quick:
        args.tokens, args.deadline, args.rounds, args.loads = 32, 20.0, 1, "cpu"
    args.model = args.model or bench_model(
        *(("qwen3", "tiny", "q8_0") if args.quick else ("qwen2", "0.5b", "q4_0"))
    )
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    loads = [s.strip() for s in args.loads.split(",") if s.strip()]
    if unknown := set(loads) - {"cpu", "llama"}:
        ap.error(f"unknown --loads {sorted(unknown)}: use cpu, llama")

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        cond: {s: [] for s in settings} for cond in ("quiet", *loads)
    }
    for r in range(args.rounds):
        order = settings if r % 2 == 0 else settings[::-1]
        for s in order:
            runs["quiet"][s].append(measure(s, args))
        for kind in loads:
            procs = start_load(kind, args)
            try:
                for s in order:
                    runs[kind][s].append(measure(s, args))
            finally:
                stop(*procs, timeout=10)

    best = {c: {s: max(v, key=lambda x: x["tok_s"]) for s, v in per.items()} for c, per in runs.items()}
    rows = []
    for s in settings:
        quiet = best["quiet"][s]["tok_s"]
        row: dict[str, Any] = {"poll": s, "quiet_tok_s": quiet, "quiet_level": best["quiet"][s]["level"]}
        for kind in loads:
            loaded = best[kind][s]
            row[kind] = {
                "tok_s": loaded["tok_s"],
                "level": loaded["level"],
                "cut_off": loaded["cut_off"],
                "ratio": loaded["tok_s"] / quiet if quiet else float("nan"),
            }
        rows.append(row)
    payload = {
        "model": str(args.model),
        "threads": args.threads,
        "tokens": args.tokens,
        "deadline_s": args.deadline,
        "rounds": args.rounds,
        "loads": {
            "cpu": f"{os.cpu_count()} x python -c 'while True: pass'",
            "llama": f"a second llama.cpp process decoding at poll 50, {args.threads} threads",
        },
        "openmp_build": _openmp_build(),
        "machine": machine(),
        "rows": rows,
        "runs": runs,
        "goal": {"ratio_min_adapt": GOAL},
    }
    table = Table(
        title=f"decode under contention: {Path(args.model).name}, {args.threads} thr, {args.tokens} tok"
    )
    table.add_column("--poll")
    table.add_column("quiet tok/s (level)")
    for kind in loads:
        table.add_column(f"{kind} load tok/s (level)")
        table.add_column(f"{kind} ratio")
    for row in rows:
        cells = [row["poll"], f"{row['quiet_tok_s']:.1f} ({row['quiet_level']})"]
        for kind in loads:
            cut = " cut" if row[kind]["cut_off"] else ""
            cells += [f"{row[kind]['tok_s']:.1f} ({row[kind]['level']}){cut}", f"{row[kind]['ratio']:.2f}"]
        table.add_row(*cells)
    table.caption = (
        f"ratio = loaded / quiet, best of {args.rounds} round(s); goal >= {GOAL} for adapt (the default)"
    )
    write_results("contention-quick" if args.quick else "contention", payload, table)


def _openmp_build() -> bool:
    from qwenkit.engines.llamacpp.threads import uses_openmp

    return uses_openmp()


if __name__ == "__main__":
    main()
