"""Images beside text streams: `qwenkit serve --mmproj` vs llama.cpp's `llama-server --mmproj` (issue 14, 8).

    python benchmarks/images.py          # Qwen3.5 0.8B shape (q4_0 text, f16 projector), 8 streams, 2 threads
    python benchmarks/images.py --quick  # tiny Qwen3.5 demo, 2 streams, 2 images: checks the script runs

Workload: --streams text chats stream at once in a closed loop (each sends its next request as soon as
the last answer ended: --text-tokens of prompt, --max-tokens answer, EOS ignored, greedy, thinking off).
Once every stream has its first token, --images image requests go out one after another (closed loop), each
a different random --image-size picture as a PNG data URL in an OpenAI `image_url` part with a short
question, so no image is ever served from a cache. Measured per side: images per minute (image requests
done / time from the first sent to the last done) and the image requests' TTFT (to the first chunk), and,
to show whether the streams stall while an image is encoded, the text streams' output tok/s and their
largest gap between two chunks during the image phase. Both servers run the same GGUF, projector, threads
and slots (--streams + 1), fresh, one after the other (never together: they would share the cores);
llama-server comes from peers.py (built from the engine's own vendored llama.cpp). The exact commands and
each side's image prompt_tokens (both preprocess the picture themselves) are in the JSON. Writes
benchmarks/results/images-*.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_model, machine, median, pct, write_results
from multiturn import one_turn
from peers import LLAMA_CPP_PYTHON_VERSION, llama_server
from serve import free_port, start, stop, wait_ready

from qwenkit.bench.client import sse_events
from qwenkit.bench.prompts import TextMaker
from qwenkit.gguf.mmproj import convert_mmproj
from qwenkit.gguf.vocab import tokenizer_from_gguf
from qwenkit.paths import cache_root

MODEL_NAME = "bench"


def projector(arch: str, size: str, outtype: str) -> Path:
    """The demo checkpoint's vision tower as an mmproj GGUF, beside bench_model's text GGUF (made once)."""
    out = cache_root() / "bench" / f"{arch}-{size}-mmproj-{outtype}.gguf"
    if not out.is_file():
        convert_mmproj(cache_root() / "bench" / f"{arch}-{size}", out, outtype)  # type: ignore[arg-type]
    return out


def data_url(side: int, seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def text_stream(
    port: int, text: str, max_tokens: int, stop_at: asyncio.Event, first: asyncio.Event
) -> list[dict[str, Any]]:
    """One closed-loop chat: chunk times of every answer until stop_at is set; first is set at its first."""
    answers = []
    while not stop_at.is_set():
        payload = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "chat_template_kwargs": {"enable_thinking": False},
        }
        times = []
        async for chunk in sse_events(port, "/v1/chat/completions", payload):
            # Every chunk with choices: with random weights a server may hold text back (partial UTF-8, tags),
            # and both send a chunk per token step.
            if chunk.get("choices"):
                times.append(time.perf_counter())
                first.set()
        answers.append({"chunks": times})
    return answers


async def workload(port: int, texts: list[str], urls: list[str], args: argparse.Namespace) -> dict[str, Any]:
    stop_at = asyncio.Event()
    firsts = [asyncio.Event() for _ in texts]
    streams = [
        asyncio.create_task(text_stream(port, t, args.max_tokens, stop_at, f))
        for t, f in zip(texts, firsts, strict=True)
    ]
    await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 900)  # every stream is streaming
    images = []
    t0 = time.perf_counter()
    for url in urls:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is in this picture?"},
                ],
            }
        ]
        images.append(await one_turn(port, messages, args.image_max_tokens))  # type: ignore[arg-type]
    t1 = time.perf_counter()
    stop_at.set()
    answers = [a for s in await asyncio.gather(*streams) for a in s]
    chunks = sorted(t for a in answers for t in a["chunks"] if t0 <= t <= t1)
    gaps = [
        b - a for a in answers for a, b in zip(a["chunks"], a["chunks"][1:], strict=False) if t0 <= b <= t1
    ]
    return {
        "images_per_min": len(urls) / (t1 - t0) * 60,
        "image_ttft_p50_s": median([r["ttft_s"] for r in images]),
        "image_ttft_p95_s": pct([r["ttft_s"] for r in images], 95),
        "image_prompt_tokens": [r["prompt_tokens"] for r in images],
        "text_tok_s_during_images": len(chunks) / (t1 - t0),
        "text_max_gap_during_images_s": max(gaps, default=float("nan")),
        "text_gap_p50_during_images_s": median(gaps),
        "image_phase_s": t1 - t0,
    }


def run_side(
    name: str, cmd: list[str], port: int, texts: list[str], urls: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    log = cache_root() / "bench" / "logs" / f"images-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = start(cmd, {**os.environ, "PYTHONUNBUFFERED": "1"}, log)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc)
        asyncio.run(one_turn(port, [{"role": "user", "content": "warm up " + "x " * 32}], 4))
        return asyncio.run(workload(port, texts, urls, args))
    except Exception:
        print(f"{name} failed; its log ({log}) ends with:\n" + log.read_text(errors="replace")[-3000:])
        raise
    finally:
        stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny Qwen3.5 demo, 2 streams, 2 small images")
    ap.add_argument("--size", help="qwen3_5 demo size (default: 0.8b; --quick: tiny)")
    ap.add_argument("--quant", help="text GGUF type (default: q4_0; --quick: f32)")
    ap.add_argument("--mmproj-type", default="f16", choices=("f32", "f16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=448, help="side of the square test pictures, pixels")
    ap.add_argument("--text-tokens", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--image-max-tokens", type=int, default=16)
    ap.add_argument("--ctx-per-seq", type=int, default=2048)
    args = ap.parse_args()
    args.size = args.size or ("tiny" if args.quick else "0.8b")
    args.quant = args.quant or ("f32" if args.quick else "q4_0")
    if args.quick:
        args.streams, args.images, args.image_size, args.text_tokens = 2, 2, 224, 48
        args.max_tokens, args.image_max_tokens, args.ctx_per_seq = 16, 4, 1024
    model = bench_model("qwen3_5", args.size, args.quant)
    mmproj = projector("qwen3_5", args.size, args.mmproj_type)
    binary = llama_server()
    make = TextMaker(tokenizer_from_gguf(model))
    texts = [f"Stream {i}: " + make(f"images/{i}", args.text_tokens) for i in range(args.streams)]
    urls = [data_url(args.image_size, seed) for seed in range(args.images)]
    slots = args.streams + 1
    ctx = slots * args.ctx_per_seq
    exe = Path(sys.executable)
    commands = {
        "qwenkit": lambda port: [
            *(str(exe.parent / "qwenkit"), "serve", "--model", str(model), "--mmproj", str(mmproj)),
            *(
                "--port",
                str(port),
                "--threads",
                str(args.threads),
                "--max-seqs",
                str(slots),
                "--ctx",
                str(ctx),
            ),
            *("--served-model-name", MODEL_NAME),
        ],
        "llama_server": lambda port: [
            *(
                str(binary),
                "-m",
                str(model),
                "--mmproj",
                str(mmproj),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ),
            *("-t", str(args.threads), "-tb", str(args.threads), "--parallel", str(slots), "-c", str(ctx)),
            *("--jinja", "--no-webui", "-a", MODEL_NAME),
        ],
    }
    results: dict[str, dict[str, Any]] = {}
    used: dict[str, list[str]] = {}
    for name, make_cmd in commands.items():
        port = free_port()
        used[name] = make_cmd(port)
        results[name] = run_side(name, used[name], port, texts, urls, args)
    ours, theirs = results["qwenkit"], results["llama_server"]
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    ratios = {
        "images_per_min": ours["images_per_min"] / theirs["images_per_min"],
        "image_ttft_p50": ours["image_ttft_p50_s"] / theirs["image_ttft_p50_s"],
        "text_tok_s_during_images": ours["text_tok_s_during_images"] / theirs["text_tok_s_during_images"],
    }
    payload = {
        "model": {"text": str(model), "mmproj": str(mmproj), "size": args.size, "quant": args.quant},
        "workload": {
            k: getattr(args, k)
            for k in ("streams", "images", "image_size", "text_tokens", "max_tokens", "image_max_tokens")
        },
        "threads": args.threads,
        "commands": used,
        "llama_server": {
            "llama_cpp_python_sdist": LLAMA_CPP_PYTHON_VERSION,
            "version": (done.stdout + done.stderr).strip(),
        },
        "machine": machine(),
        "qwenkit": ours,
        "llama_server_results": theirs,
        "ratios": ratios,
    }
    table = Table(
        title=f"1 image request at a time beside {args.streams} text streams: {model.name} + {mmproj.name}, "
        f"{args.threads} thr, {args.images} images of {args.image_size}px"
    )
    for col in ("", "qwenkit", "llama-server", "ratio"):
        table.add_column(col)
    rows = (
        ("images / min", "images_per_min", ".2f", "images_per_min"),
        ("image TTFT p50 s", "image_ttft_p50_s", ".2f", "image_ttft_p50"),
        ("image TTFT p95 s", "image_ttft_p95_s", ".2f", None),
        ("text tok/s meanwhile", "text_tok_s_during_images", ".1f", "text_tok_s_during_images"),
        ("largest text gap s", "text_max_gap_during_images_s", ".2f", None),
    )
    for label, key, spec, ratio in rows:
        r = f"{ratios[ratio]:.2f}x" if ratio else "-"
        table.add_row(label, format(ours[key], spec), format(theirs[key], spec), r)
    write_results("images-quick" if args.quick else "images", payload, table)


if __name__ == "__main__":
    main()
