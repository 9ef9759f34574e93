"""Benchmark helpers: models in real shapes, memory bandwidth, percentiles, JSON + table output."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from qwenkit.checkpoints.demo import DemoArch, DemoSize, create_demo, is_demo_checkpoint
from qwenkit.gguf.convert import convert_to_gguf
from qwenkit.gguf.quantize import quantize_gguf
from qwenkit.paths import cache_root

RESULTS = Path(__file__).parent / "results"


def bench_model(arch: str, size: str, quant: str) -> Path:
    """A random-weight checkpoint of this arch/size as a GGUF of this type, built once under the cache."""
    root = cache_root() / "bench"
    ckpt = root / f"{arch}-{size}"
    if not is_demo_checkpoint(ckpt):
        create_demo(ckpt, arch=DemoArch(arch), size=DemoSize(size))
    out = root / f"{arch}-{size}-{quant}.gguf"
    if not out.is_file():
        if quant in ("f32", "f16", "bf16", "q8_0"):
            convert_to_gguf(ckpt, out, quant)  # type: ignore[arg-type]
        else:
            f16 = root / f"{arch}-{size}-f16.gguf"
            if not f16.is_file():
                convert_to_gguf(ckpt, f16, "f16")
            quantize_gguf(f16, out, quant)  # type: ignore[arg-type]
    return out


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, Any]:
    from qwenkit.hardware import physical_cores

    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "physical_cores": physical_cores(),
    }


def write_results(name: str, payload: dict[str, Any], table: Table) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    (RESULTS / f"{name}-latest.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    console = Console()
    console.print(table)
    console.print(f"results: {path}")
    return path
