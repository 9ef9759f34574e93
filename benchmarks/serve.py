"""`qwenkit serve` speed, side by side in one run (issue: the OpenAI-compatible server).

    python benchmarks/serve.py           # random-weight Qwen2.5-0.5B shape, q4_0, 2 threads
    python benchmarks/serve.py --quick   # the tiny demo model, 1 and 4 streams

Same GGUF and threads for all three: at 1/4/8/16 concurrent streaming requests (a ~64-token prompt,
128 new tokens, greedy), aggregate tok/s and TTFT p50/p95 through HTTP to `qwenkit serve`, the same load
on the engine in-process (goal: HTTP costs <= 5% throughput), and HTTP to llama-cpp-python's server
(`python -m llama_cpp.server --interrupt_requests False`; goal: qwenkit >= 1.9x its aggregate at 16
streams and TTFT p50 <= 1/4 of its). Writes benchmarks/results/serve-*.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from children import start, stop  # the other benchmarks import them from here
from common import bench_model, machine, median, pct, write_results
from engine import MAX_SEQS, NEW_TOKENS, Recorder

from qwenkit.bench.client import sse_events
from qwenkit.bench.prompts import WORDS
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.engines.request import GenerationRequest
from qwenkit.engines.sampling import SamplingParams
from qwenkit.gguf.vocab import tokenizer_from_gguf

CONCURRENCY = (1, 4, 8, 16)
CTX_PER_SEQ = 512


def prompt_text(i: int, salt: int = 0) -> str:
    # ~64 tokens of plain words, different per request and per run so no prefix is shared (or cached).
    head = f"run {salt} request {i}:"
    return head + " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] + str((i * 31 + j) % 97) for j in range(24))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early ({proc.returncode}): {url}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready: {url}")


async def one_stream(port: int, model: str, i: int, t0: float, salt: int) -> dict[str, float]:
    """One streaming /v1/completions; TTFT is the first chunk carrying text."""
    payload = {
        "model": model,
        "prompt": prompt_text(i, salt),
        "max_tokens": NEW_TOKENS,
        "temperature": 0.0,
        "stream": True,
    }
    first: float | None = None
    n_chunks = 0
    async for chunk in sse_events(port, "/v1/completions", payload):
        if any(c.get("text") for c in chunk.get("choices", ())):
            n_chunks += 1
            first = first or time.perf_counter()
    return {"ttft": (first or time.perf_counter()) - t0, "end": time.perf_counter(), "chunks": n_chunks}


async def http_load(port: int, model: str, n: int, tokens_per_request: int, salt: int) -> dict[str, float]:
    await one_stream(port, model, 999, time.perf_counter(), salt)  # warm-up
    cpu0, t0 = time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(one_stream(port, model, i, t0, salt) for i in range(n)))
    end = max(r["end"] for r in results)
    ttft = [r["ttft"] for r in results]
    return {
        "aggregate_tok_s": n * tokens_per_request / (end - t0),
        "ttft_p50_s": median(ttft),
        "ttft_p95_s": pct(ttft, 95),
        "chunks_per_stream": median([r["chunks"] for r in results]),
        "client_cpu_share": (time.process_time() - cpu0) / (end - t0),
    }


def in_process(engine: LlamaCppEngine, prompts: list[tuple[int, ...]], tag: str) -> dict[str, float]:
    """The same load on the engine itself, no HTTP: events timestamped on the engine thread."""
    rec = Recorder()
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        engine.submit(GenerationRequest(f"{tag}-{i}", ids, params), rec.sink(f"{tag}-{i}"))
    rec.done.wait()
    end = max(ts[-1] for ts in rec.times.values())
    ttft = [ts[0] - t0 for ts in rec.times.values()]
    return {
        "aggregate_tok_s": sum(len(ts) for ts in rec.times.values()) / (end - t0),
        "ttft_p50_s": median(ttft),
        "ttft_p95_s": pct(ttft, 95),
    }


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    return {**max(runs, key=lambda r: r["aggregate_tok_s"]), "rounds": [r["aggregate_tok_s"] for r in runs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quant", default="q4_0")
    ap.add_argument("--streams", type=int, nargs="+", default=list(CONCURRENCY), help="concurrency levels")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per setting; best round kept")
    args = ap.parse_args()
    arch, size = ("qwen3", "tiny") if args.quick else ("qwen2", "0.5b")
    model_path = bench_model(arch, size, "q8_0" if args.quick else args.quant)
    concurrency = (1, 4) if args.quick else tuple(args.streams)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    exe = Path(sys.executable)

    ours_port, theirs_port = free_port(), free_port()
    ours_cmd = [str(exe.parent / "qwenkit"), "serve", "--model", str(model_path), "--port", str(ours_port)]
    ours_cmd += [
        "--threads",
        str(args.threads),
        "--max-seqs",
        str(MAX_SEQS),
        "--ctx",
        str(MAX_SEQS * CTX_PER_SEQ),
    ]
    ours_cmd += ["--served-model-name", "bench"]
    theirs_cmd = [str(exe), "-m", "llama_cpp.server", "--model", str(model_path), "--port", str(theirs_port)]
    theirs_cmd += [
        "--n_threads",
        str(args.threads),
        "--n_threads_batch",
        str(args.threads),
        "--n_ctx",
        "2048",
    ]
    theirs_cmd += ["--interrupt_requests", "False", "--model_alias", "bench"]
    # All three stay loaded (idle ones cost no CPU) and take turns, so drifting machine load hits each alike.
    procs = [start(ours_cmd, env), start(theirs_cmd, env)]
    engine = LlamaCppEngine(
        model_path, EngineConfig(n_ctx=MAX_SEQS * CTX_PER_SEQ, max_seqs=MAX_SEQS, threads=args.threads)
    )
    engine.start()
    tokenizer = tokenizer_from_gguf(model_path)
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        k: {n: [] for n in concurrency} for k in ("o", "e", "t")
    }
    try:
        wait_ready(f"http://127.0.0.1:{ours_port}/health", procs[0])
        wait_ready(f"http://127.0.0.1:{theirs_port}/v1/models", procs[1])
        salts = itertools.count(1)  # new prompts every run: no side may answer from a cached prefix
        for _ in range(args.rounds):
            for n in concurrency:
                salt = next(salts)
                runs["o"][n].append(asyncio.run(http_load(ours_port, "bench", n, NEW_TOKENS, salt)))
                prompts = [tuple(tokenizer.encode_text(prompt_text(i, salt))) for i in range(n)]
                runs["e"][n].append(in_process(engine, prompts, f"s{salt}"))
                runs["t"][n].append(asyncio.run(http_load(theirs_port, "bench", n, NEW_TOKENS, salt)))
    finally:
        for proc in procs:
            stop(proc)
        engine.shutdown(timeout=5)
    ours_http = {n: best(v) for n, v in runs["o"].items()}
    engine_runs = {n: best(v) for n, v in runs["e"].items()}
    theirs_http = {n: best(v) for n, v in runs["t"].items()}

    rows: list[dict[str, Any]] = []
    for n in concurrency:
        rows.append(
            {
                "streams": n,
                "qwenkit_http": ours_http[n],
                "engine_in_process": engine_runs[n],
                "llama_cpp_server": theirs_http[n],
                "http_cost": 1 - ours_http[n]["aggregate_tok_s"] / engine_runs[n]["aggregate_tok_s"],
                "vs_llama_cpp_server": ours_http[n]["aggregate_tok_s"] / theirs_http[n]["aggregate_tok_s"],
                "ttft_p50_ratio": ours_http[n]["ttft_p50_s"] / theirs_http[n]["ttft_p50_s"],
            }
        )
    payload = {
        "model": {"path": str(model_path), "arch": arch, "size": size},
        "threads": args.threads,
        "rounds": args.rounds,
        "load_generator": "raw asyncio sockets, one process; client_cpu_share = its CPU seconds per second",
        "machine": machine(),
        "rows": rows,
        "goals": {
            "http_cost_max": 0.05,
            "vs_llama_cpp_server_at_16_min": 1.9,
            "ttft_p50_ratio_at_16_max": 0.25,
        },
    }
    table = Table(
        title=f"qwenkit serve vs engine in-process vs llama_cpp.server: {model_path.name}, {args.threads} thr"
    )
    for col in (
        "streams",
        "qwenkit HTTP tok/s",
        "in-process tok/s",
        "HTTP cost",
        "llama_cpp.server tok/s",
        "ratio",
        "TTFT p50 ours / theirs s",
    ):
        table.add_column(col)
    for r in rows:
        o, e, t = r["qwenkit_http"], r["engine_in_process"], r["llama_cpp_server"]
        table.add_row(
            str(r["streams"]),
            f"{o['aggregate_tok_s']:.1f}",
            f"{e['aggregate_tok_s']:.1f}",
            f"{r['http_cost']:.1%}",
            f"{t['aggregate_tok_s']:.1f}",
            f"{r['vs_llama_cpp_server']:.2f}x",
            f"{o['ttft_p50_s']:.2f} / {t['ttft_p50_s']:.2f}",
        )
    write_results("serve-quick" if args.quick else "serve", payload, table)


if __name__ == "__main__":
    main()
