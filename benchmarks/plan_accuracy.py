"""Planner accuracy on real shapes (issue: catalog, planner, select).

    python benchmarks/plan_accuracy.py           # random-weight models in the exact Qwen2.5-0.5B/1.5B shapes
    python benchmarks/plan_accuracy.py --quick   # the small demo models, a smoke run
    python benchmarks/plan_accuracy.py --hybrid  # Qwen3.5 hybrids (qwen3_5 / qwen3_5_moe demos) only
    python benchmarks/plan_accuracy.py --hybrid --quick  # the hybrids at the small demo size

For each configuration, in one run on this machine:
  1. the plan made before any download, from the catalog entry (Qwen2.5-0.5B-Instruct / -1.5B-Instruct,
     Qwen3.5-0.8B; the demo's config where the catalog has no such model): predicted peak resident memory,
     from the runtime baseline measured with the model's own vocabulary and llama.cpp's buffer sizes (for
     the Gated DeltaNet hybrids: KV on the full-attention layers only plus the recurrent state per slot);
  2. the measured peak RSS (VmHWM) of a fresh process that loads the GGUF into LlamaCppEngine with the
     planned n_ctx / max_seqs / kv_type, keeps every slot busy, then fills one sequence's context;
goal: |predicted / measured - 1| <= 10% everywhere. Also reports the planner's decode estimate (memory
bandwidth / bytes per token) next to the measured single-stream decode speed, for information.
Writes benchmarks/results/plan_accuracy-*.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_model, machine, write_results

from qwenkit import hardware
from qwenkit.catalog import load_catalog
from qwenkit.catalog.formats import parse_format
from qwenkit.catalog.measure import measure_engine_run, measure_runtime_baseline
from qwenkit.catalog.planner import Device, PlanRequest, plan
from qwenkit.catalog.shape import ModelShape
from qwenkit.checkpoints.demo import DemoArch, DemoSize, demo_config

GOAL = 0.10
MIB = 1024 * 1024
# (demo arch, size, weight format, context per sequence, sequences, KV type, flash attention)
FULL = [
    ("qwen2", "0.5b", "q8_0", 4096, 1, "f16", False),
    ("qwen2", "0.5b", "q4_0", 2048, 4, "f16", False),
    ("qwen2", "0.5b", "q4_k_m", 4096, 2, "q8_0", True),
    ("qwen2", "1.5b", "q8_0", 4096, 1, "f16", False),
    ("qwen2", "1.5b", "q4_k_m", 2048, 2, "f16", True),
]
QUICK = [
    ("qwen3", "small", "q8_0", 2048, 2, "f16", False),
    ("qwen3_moe", "small", "q4_k_m", 2048, 2, "f16", False),
]
# Qwen3.5 (Gated DeltaNet hybrids): Qwen3.5-0.8B's exact shape, dense and an MoE variant of it.
HYBRID = [
    ("qwen3_5", "0.8b", "q8_0", 4096, 1, "f16", False),
    ("qwen3_5", "0.8b", "q4_k_m", 2048, 4, "f16", False),
    ("qwen3_5_moe", "0.8b", "q4_k_m", 2048, 2, "f16", False),
]
HYBRID_QUICK = [
    ("qwen3_5", "small", "f16", 2048, 2, "f16", False),
    ("qwen3_5", "small", "q8_0", 1024, 4, "f16", False),
    ("qwen3_5_moe", "small", "q4_k_m", 2048, 2, "f16", False),
    ("qwen3_5_moe", "small", "q8_0", 1024, 4, "q8_0", True),
]
CATALOG_NAME = {
    ("qwen2", "0.5b"): "Qwen2.5-0.5B-Instruct",
    ("qwen2", "1.5b"): "Qwen2.5-1.5B-Instruct",
    ("qwen3_5", "0.8b"): "Qwen3.5-0.8B",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small demo models only")
    parser.add_argument("--hybrid", action="store_true", help="the Qwen3.5 hybrid demos only")
    parser.add_argument("--threads", type=int, default=hardware.physical_cores())
    args = parser.parse_args()
    groups = {(False, False): FULL, (False, True): QUICK, (True, False): HYBRID, (True, True): HYBRID_QUICK}
    configs = groups[(args.hybrid, args.quick)]

    catalog = load_catalog()
    bandwidth = hardware.memory_bandwidth()
    # The baseline holds the vocabulary, so it is measured per vocabulary (Qwen3.5 has 248,320 tokens).
    baselines = {
        hybrid: measure_runtime_baseline(bench_model("qwen3_5" if hybrid else "qwen3", "tiny", "q8_0"))
        for hybrid in {DemoArch(c[0]).hybrid for c in configs}
    }
    mem = hardware.memory_info()
    device = Device(
        "cpu", mem.total or 0, mem.available, bandwidth.read_gbs, hardware.cpu_flags(), "this machine"
    )
    rows: list[dict[str, Any]] = []
    for arch, size, fmt, ctx, seqs, kv, flash in configs:
        path = bench_model(arch, size, fmt)
        baseline = baselines[DemoArch(arch).hybrid]
        # The plan a user gets before downloading: the catalog's shape (the demo's config for the smoke run).
        if (arch, size) in CATALOG_NAME:
            shape = catalog.get(CATALOG_NAME[(arch, size)]).shape()
        else:
            shape = ModelShape.from_config(demo_config(DemoArch(arch), DemoSize(size)), f"{arch}-{size}")
        request = PlanRequest(
            shape, parse_format(fmt), ctx, seqs, device, kv_type=kv, flash_attn=flash, runtime=baseline
        )
        p = plan(request)
        run = measure_engine_run(
            path,
            n_ctx=ctx * seqs,
            max_seqs=seqs,
            kv_type=kv,
            flash_attn=flash,
            threads=args.threads,
            decode_tokens=32,
        )
        error = p.memory.peak / run.peak_bytes - 1
        rows.append(
            {
                "model": shape.name,
                "gguf": path.name,
                "format": fmt,
                "context": ctx,
                "sequences": seqs,
                "kv_type": kv,
                "flash_attn": flash,
                "predicted_peak_bytes": p.memory.peak,
                "measured_peak_bytes": run.peak_bytes,
                "error": error,
                "within_goal": abs(error) <= GOAL,
                "prediction": asdict(p.memory),
                "hybrid": shape.is_hybrid,
                "kv_layers": shape.kv_layers,
                "recurrent_state_bytes_per_seq": shape.recurrent_state_bytes_per_seq(),
                "prompt_tokens": run.prompt_tokens,
                "decode_estimate_tok_s": p.speed.single_tok_s,
                "decode_measured_tok_s": run.decode_tok_s,
            }
        )
        print(
            f"{path.name}: predicted {p.memory.peak / MIB:.0f} MiB, measured {run.peak_bytes / MIB:.0f} MiB"
        )

    table = Table(title=f"planner accuracy: predicted vs measured peak RSS (goal ±{GOAL:.0%})")
    for col in (
        "model",
        "format",
        "ctx × seqs",
        "KV",
        "predicted MiB",
        "measured MiB",
        "error",
        "decode est/meas tok/s",
    ):
        table.add_column(col, justify="left" if col in ("model", "format", "KV") else "right")
    for r in rows:
        kv = r["kv_type"] + (" +FA" if r["flash_attn"] else "")
        est, meas = r["decode_estimate_tok_s"], r["decode_measured_tok_s"]
        table.add_row(
            r["model"],
            r["format"],
            f"{r['context']} × {r['sequences']}",
            kv,
            f"{r['predicted_peak_bytes'] / MIB:.0f}",
            f"{r['measured_peak_bytes'] / MIB:.0f}",
            f"{r['error']:+.1%}",
            f"{est:.0f} / {meas:.0f}" if est and meas else "-",
        )
    payload = {
        "goal": GOAL,
        "all_within_goal": all(r["within_goal"] for r in rows),
        "machine": machine(),
        "bandwidth": asdict(bandwidth),
        "runtime_baseline": {("qwen3_5" if h else "qwen3"): asdict(b) for h, b in baselines.items()},
        "threads": args.threads,
        "rows": rows,
    }
    name = "plan_accuracy" + ("-hybrid" if args.hybrid else "") + ("-quick" if args.quick else "")
    write_results(name, payload, table)


if __name__ == "__main__":
    main()
