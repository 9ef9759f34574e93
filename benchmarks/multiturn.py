"""Multi-turn agent chats: `qwenkit serve` vs llama.cpp's own C++ llama-server (issue 11, item 7).

    python benchmarks/multiturn.py            # Qwen3.5 0.8B shape, q4_0, 8 chats x 6 turns, 2 threads
    python benchmarks/multiturn.py --quick    # tiny qwen3 demo, 2 chats x 2 turns: checks the script runs

Workload: --convs conversations at once, --turns turns each, closed loop: turn k+1 goes out when turn k's
answer has streamed in, carrying the whole history (a system prompt, every earlier user message and the
answers as the server streamed them) plus a new user message of ~--user-tokens, so histories grow to ~4k
tokens. Streaming /v1/chat/completions over qwenkit.bench's raw-socket client: greedy, --max-tokens per turn
with EOS ignored, thinking off (chat_template_kwargs; --thinking turns it on). Same user text on both sides;
answers (random weights) are each server's own. Both servers run the same GGUF and threads with --convs slots
of --ctx-per-seq tokens each, fresh, one after the other (never together: they would share the cores); the
exact commands are in the JSON. llama-server (peers.py: built from the engine's own vendored llama.cpp) keeps
its prompt cache defaults. Reports per turn TTFT p50/p95 (to the first chunk: both send it with the first
token, even when their parsers hold text back) and aggregate decode two ways: output tok/s = every answer
token / the workload's wall time (what vLLM's and qwenkit's `bench` call output throughput), and decode tok/s
while streaming = tokens after each answer's first / time during which at least one answer was streaming. The
second rewards a server whose answers stream in bursts while new prompts wait (in a closed loop, prompt time
that delays no stream is not counted), so it pulls against TTFT; both are reported. Goals: TTFT p50 over turns
>= 2 <= 0.5x llama-server's; aggregate decode >= 1.0x. Writes benchmarks/results/multiturn-*.json and prints a
table.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_model, machine, median, pct, write_results
from peers import LLAMA_CPP_PYTHON_VERSION, llama_server
from serve import free_port, start, stop, wait_ready

from qwenkit.bench.client import sse_events
from qwenkit.bench.prompts import TextMaker
from qwenkit.gguf.vocab import tokenizer_from_gguf
from qwenkit.paths import cache_root

MODEL_NAME = "bench"
Script = list[tuple[str, list[str]]]  # per conversation: its system prompt and its user messages


def conversation_script(make: TextMaker, args: argparse.Namespace, salt: int) -> Script:
    """Each conversation's system prompt and user messages (one per turn), the same for a given salt."""
    return [
        (
            f"You are agent {c} of run {salt}. " + make(f"{salt}/{c}/system", args.system_tokens),
            [f"Step {t}: " + make(f"{salt}/{c}/{t}", args.user_tokens) for t in range(args.turns)],
        )
        for c in range(args.convs)
    ]


async def one_turn(
    port: int, messages: list[dict[str, str]], max_tokens: int, thinking: bool = False
) -> dict[str, Any]:
    payload = {
        "model": MODEL_NAME,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "chat_template_kwargs": {"enable_thinking": thinking},
    }
    t0 = time.perf_counter()
    first: float | None = None  # the first chunk: both servers send it (the role) with the first token
    first_text: float | None = None  # later when the server holds text back (random weights: whitespace)
    content: list[str] = []
    n_chunks = 0
    usage: dict[str, Any] = {}
    async for chunk in sse_events(port, "/v1/chat/completions", payload):
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", ()):
            first = first or time.perf_counter()
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
                n_chunks += 1
                first_text = first_text or time.perf_counter()
                content.append(delta.get("content") or "")
    end = time.perf_counter()
    details = usage.get("prompt_tokens_details") or {}
    return {
        "ttft_s": (first or end) - t0,
        "ttft_text_s": (first_text or end) - t0,
        "first": first or end,
        "end": end,
        "text_chunks": n_chunks,
        "completion_tokens": usage.get("completion_tokens", n_chunks),
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": details.get("cached_tokens"),
        "answer": "".join(content),
    }


PLACEHOLDER = re.compile(r"<\|qwenkit_unused_\d+\|>")


async def conversation(
    port: int, system: str, users: list[str], max_tokens: int, thinking: bool
) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": system}]
    turns = []
    for user in users:
        messages.append({"role": "user", "content": user})
        result = await one_turn(port, messages, max_tokens, thinking)
        # The demo tokenizer's placeholder ids (<|qwenkit_unused_N|>; random weights pick them often) return
        # as text that re-tokenizes to ~10 tokens each; a real model writes none. Drop them from the history.
        messages.append({"role": "assistant", "content": PLACEHOLDER.sub("", result.pop("answer"))})
        turns.append(result)
    return turns


async def workload(port: int, script: Script, max_tokens: int, thinking: bool) -> dict[str, Any]:
    cpu0, t0 = time.process_time(), time.perf_counter()
    convs = await asyncio.gather(*(conversation(port, s, u, max_tokens, thinking) for s, u in script))
    wall = time.perf_counter() - t0
    return {"convs": convs, "wall_s": wall, "client_cpu_share": (time.process_time() - cpu0) / wall}


def streaming_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [first token, last token] intervals: time when some answer was streaming."""
    total, reach = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > reach:
            total += hi - max(lo, reach)
            reach = hi
    return total


def summarize(run: dict[str, Any], turns: int) -> dict[str, Any]:
    reqs = [r for conv in run["convs"] for r in conv]
    per_turn = []
    for t in range(turns):
        at = [conv[t] for conv in run["convs"]]
        ttft = [r["ttft_s"] for r in at]
        prompt = [r["prompt_tokens"] for r in at if r["prompt_tokens"] is not None]
        cached = [r["cached_tokens"] for r in at if r["cached_tokens"] is not None]
        per_turn.append(
            {
                "turn": t + 1,
                "ttft_p50_s": median(ttft),
                "ttft_p95_s": pct(ttft, 95),
                "ttft_text_p50_s": median([r["ttft_text_s"] for r in at]),
                "prompt_tokens_mean": statistics.fmean(prompt) if prompt else None,
                "cached_tokens_mean": statistics.fmean(cached) if cached else None,
            }
        )
    later = [conv[t]["ttft_s"] for conv in run["convs"] for t in range(1, turns)]
    decoded = sum(max(0, r["completion_tokens"] - 1) for r in reqs)
    return {
        "per_turn": per_turn,
        "ttft_p50_turns_ge2_s": median(later),
        "ttft_p95_turns_ge2_s": pct(later, 95),
        "decode_tok_s": decoded / (streaming_time([(r["first"], r["end"]) for r in reqs]) or math.nan),
        "end_to_end_tok_s": sum(r["completion_tokens"] for r in reqs) / run["wall_s"],
        "answers_without_text": sum(r["text_chunks"] == 0 for r in reqs),
        "completion_tokens": sorted({r["completion_tokens"] for r in reqs}),
        "wall_s": run["wall_s"],
        "client_cpu_share": run["client_cpu_share"],
        "requests": [
            [{k: v for k, v in r.items() if k not in ("first", "end")} for r in c] for c in run["convs"]
        ],
    }


def run_side(
    name: str, cmd: list[str], health: str, port: int, script: Script, args: argparse.Namespace
) -> dict[str, Any]:
    """A fresh server: warm it up with a chat of its own, run the workload, stop it."""
    log = cache_root() / "bench" / "logs" / f"multiturn-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_bytes(b"")
    proc = start(cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}, log)
    try:
        wait_ready(f"http://127.0.0.1:{port}{health}", proc)
        asyncio.run(one_turn(port, [{"role": "user", "content": "warm up " + "x " * 32}], 4))
        return summarize(asyncio.run(workload(port, script, args.max_tokens, args.thinking)), args.turns)
    except Exception:
        print(f"{name} failed; its log ({log}) ends with:\n" + log.read_text(errors="replace")[-3000:])
        raise
    finally:
        stop(proc)


def llama_server_cache_defaults(binary: Path) -> dict[str, str]:
    """The prompt-cache settings llama-server runs with here (all its defaults), as its --help states them."""
    done = subprocess.run([str(binary), "--help"], capture_output=True, text=True)
    options = re.split(r"\n(?=-)", done.stdout + done.stderr)
    wanted = ("--cache-prompt", "--cache-reuse", "--cache-ram", "--cache-idle-slots", "--ctx-checkpoints")
    wanted += ("--checkpoint-min-step", "--kv-unified")
    out = {}
    for option in options:
        text = " ".join(option.split())
        name = next((w for w in wanted if w + " " in text + " " or w + "," in text), None)
        if name and (found := re.search(r"\(default: ([^)]*)\)", text)):
            out[name] = found.group(1)
    return out


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One round as is; several: each number is the median over rounds (the machine is noisy)."""
    if len(rounds) == 1:
        return rounds[0]
    out = {k: median([r[k] for r in rounds]) for k in ("ttft_p50_turns_ge2_s", "ttft_p95_turns_ge2_s")}
    out |= {
        k: median([r[k] for r in rounds])
        for k in ("decode_tok_s", "end_to_end_tok_s", "wall_s", "answers_without_text")
    }
    out["per_turn"] = [
        {"turn": t + 1}
        | {
            k: median([r["per_turn"][t][k] for r in rounds if r["per_turn"][t][k] is not None] or [math.nan])
            for k in rounds[0]["per_turn"][t]
            if k != "turn"
        }
        for t in range(len(rounds[0]["per_turn"]))
    ]
    out["rounds"] = rounds
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny qwen3 demo, 2 chats x 2 turns, short texts")
    ap.add_argument("--model", type=Path, help="a GGUF to use instead of the demo of --arch/--size/--quant")
    ap.add_argument("--arch", help="demo architecture (default: qwen3_5; --quick: qwen3)")
    ap.add_argument("--size", help="demo size (default: 0.8b; --quick: tiny)")
    ap.add_argument("--quant", help="GGUF type (default: q4_0; --quick: q8_0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--convs", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-tokens", type=int, default=400)
    ap.add_argument("--user-tokens", type=int, default=550)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ctx-per-seq", type=int, default=5120, help="context of each of the --convs slots")
    ap.add_argument("--rounds", type=int, default=1, help="rounds, sides alternating; medians reported")
    ap.add_argument(
        "--thinking",
        action="store_true",
        help="thinking on (Qwen3.5's default): later turns' histories drop the earlier answers' reasoning",
    )
    ap.add_argument(
        "--only",
        choices=("qwenkit", "llama_server"),
        help="measure one side only (to study it; no ratios then)",
    )
    ap.add_argument(
        "--qwenkit-arg",
        action="append",
        default=[],
        help="extra `qwenkit serve` argument: --qwenkit-arg=--state-cache-mb=8192",
    )
    ap.add_argument(
        "--llama-server-arg",
        action="append",
        default=[],
        help="one extra llama-server word: --llama-server-arg=--cache-reuse --llama-server-arg=256",
    )
    args = ap.parse_args()
    default_model = ("qwen3", "tiny", "q8_0") if args.quick else ("qwen3_5", "0.8b", "q4_0")
    for key, default in zip(("arch", "size", "quant"), default_model, strict=True):
        setattr(args, key, getattr(args, key) or default)
    if args.quick:
        args.convs, args.turns, args.system_tokens, args.user_tokens = 2, 2, 64, 96
        args.max_tokens, args.ctx_per_seq = 16, 1024
    model_path = args.model or bench_model(args.arch, args.size, args.quant)
    binary = llama_server()
    make = TextMaker(tokenizer_from_gguf(model_path))
    exe = Path(sys.executable)
    ctx = args.convs * args.ctx_per_seq

    def ours_cmd(port: int) -> list[str]:
        return [
            *(str(exe.parent / "qwenkit"), "serve", "--model", str(model_path), "--port", str(port)),
            *("--threads", str(args.threads), "--max-seqs", str(args.convs), "--ctx", str(ctx)),
            *("--served-model-name", MODEL_NAME, *args.qwenkit_arg),
        ]

    def theirs_cmd(port: int) -> list[str]:
        # --parallel N (not auto) keeps one KV cache per slot, -c / N tokens each; prompt cache at defaults.
        return [
            *(str(binary), "-m", str(model_path), "--host", "127.0.0.1", "--port", str(port)),
            *("-t", str(args.threads), "-tb", str(args.threads)),
            *("--parallel", str(args.convs), "-c", str(ctx)),
            *("--jinja", "--no-webui", "-a", MODEL_NAME, *args.llama_server_arg),
        ]

    sides = {"qwenkit": (ours_cmd, "/health"), "llama_server": (theirs_cmd, "/health")}
    if args.only:
        sides = {args.only: sides[args.only]}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    commands: dict[str, list[str]] = {}
    for r in range(args.rounds):
        script = conversation_script(make, args, salt=r)  # same text for both sides within a round
        for name in sides if r % 2 == 0 else reversed(sides):
            make_cmd, health = sides[name]
            port = free_port()
            commands[name] = make_cmd(port)
            results[name].append(run_side(name, commands[name], health, port, script, args))
    if args.only:
        only = combine(results[args.only])
        keys = ("ttft_p50_turns_ge2_s", "ttft_p95_turns_ge2_s", "decode_tok_s", "end_to_end_tok_s", "wall_s")
        print({k: round(only[k], 2) for k in keys})
        for t in only["per_turn"]:
            print({k: v if isinstance(v, int) else round(v or 0, 2) for k, v in t.items()})
        return
    ours, theirs = combine(results["qwenkit"]), combine(results["llama_server"])
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    version = (done.stdout + done.stderr).strip()

    ttft_ratio = ours["ttft_p50_turns_ge2_s"] / theirs["ttft_p50_turns_ge2_s"]
    decode_ratio = ours["decode_tok_s"] / theirs["decode_tok_s"]
    output_ratio = ours["end_to_end_tok_s"] / theirs["end_to_end_tok_s"]
    payload = {
        "model": {"path": str(model_path), "arch": args.arch, "size": args.size, "quant": args.quant},
        "workload": {
            k: getattr(args, k)
            for k in (
                *("convs", "turns", "system_tokens", "user_tokens", "max_tokens", "ctx_per_seq", "rounds"),
                "thinking",
            )
        },
        "threads": args.threads,
        "commands": commands,
        "llama_server": {
            "llama_cpp_python_sdist": LLAMA_CPP_PYTHON_VERSION,
            "version": version,
            "cache_defaults": llama_server_cache_defaults(binary),
        },
        "load_generator": "raw asyncio sockets (qwenkit.bench.client), one process",
        "decode_tok_s": "tokens after each answer's first / time when at least one answer was streaming",
        "machine": machine(),
        "qwenkit": ours,
        "llama_server_results": theirs,
        "ratios": {
            "ttft_p50_turns_ge2": ttft_ratio,
            "output_tok_s": output_ratio,
            "decode_tok_s_while_streaming": decode_ratio,
        },
        "goals": {"ttft_p50_turns_ge2_max": 0.5, "decode_tok_s_min": 1.0},
    }

    table = Table(
        title=f"multi-turn chats, qwenkit serve vs llama-server: {model_path.name}, {args.threads} thr, "
        f"{args.convs} chats x {args.turns} turns"
    )
    for col in ("turn", "prompt tok", "cached tok", "TTFT p50 s", "p50 ratio", "TTFT p95 s"):
        table.add_column(col + (" ours / theirs" if col != "turn" and "ratio" not in col else ""))

    def num(v: float | None, spec: str = ".0f") -> str:
        return "-" if v is None or math.isnan(v) else format(v, spec)

    for o, t in zip(ours["per_turn"], theirs["per_turn"], strict=True):
        table.add_row(
            str(o["turn"]),
            f"{num(o['prompt_tokens_mean'])} / {num(t['prompt_tokens_mean'])}",
            f"{num(o['cached_tokens_mean'])} / {num(t['cached_tokens_mean'])}",
            f"{o['ttft_p50_s']:.2f} / {t['ttft_p50_s']:.2f}",
            f"{o['ttft_p50_s'] / t['ttft_p50_s']:.2f}x",
            f"{o['ttft_p95_s']:.2f} / {t['ttft_p95_s']:.2f}",
        )
    table.caption = (
        f"TTFT p50 turns>=2: {ours['ttft_p50_turns_ge2_s']:.2f} / {theirs['ttft_p50_turns_ge2_s']:.2f} s = "
        f"{ttft_ratio:.2f}x (goal <= 0.5x); output tok/s: {ours['end_to_end_tok_s']:.1f} / "
        f"{theirs['end_to_end_tok_s']:.1f} = {output_ratio:.2f}x (goal >= 1.0x); "
        f"decode tok/s while streaming: {ours['decode_tok_s']:.1f} / {theirs['decode_tok_s']:.1f} = "
        f"{decode_ratio:.2f}x; answers without text: "
        f"{ours['answers_without_text']:g} / {theirs['answers_without_text']:g}"
    )
    name = "multiturn-quick" if args.quick else "multiturn"
    write_results(name + ("-thinking" if args.thinking else ""), payload, table)


if __name__ == "__main__":
    main()
