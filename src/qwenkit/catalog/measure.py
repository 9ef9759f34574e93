"""Measured memory of the llama.cpp engine, each measurement in a fresh Python process.

Contract: measure_runtime_baseline(gguf) returns the resident memory of a process that imported the
engine, read the GGUF's metadata and loaded its vocabulary only (llama.cpp's vocab_only): the part of an
engine process that no weight, KV or compute buffer explains. measure_engine_run(gguf, ...) returns the
peak resident memory (VmHWM) of a process that loads the GGUF into LlamaCppEngine and runs a workload
that reaches the configuration's worst case: every slot busy, then one prompt that fills a sequence's
context in n_batch chunks. cached_runtime_baseline() measures the baseline once per qwenkit/Python/
llama-cpp-python version and vocabulary (the built-in demo's Qwen2/Qwen3 one; a tiny Qwen3.5 demo's
248,320-token one for vocabularies past Qwen2's, since the baseline holds the vocabulary) and keeps it in
the qwenkit cache.
Both run `python -m qwenkit.catalog.measure`, so none of the caller's memory is counted.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qwenkit.paths import cache_root

__all__ = [
    "EngineRun",
    "MeasureError",
    "RuntimeBaseline",
    "cached_runtime_baseline",
    "measure_engine_run",
    "measure_runtime_baseline",
]


class MeasureError(RuntimeError):
    """A measurement subprocess failed; the message carries its last error line."""


@dataclass(frozen=True)
class RuntimeBaseline:
    """Resident bytes of an engine process before any weight, KV or compute buffer: steady and peak."""

    steady_bytes: int
    peak_bytes: int
    source: str  # "measured on this machine" or a description of the fallback


@dataclass(frozen=True)
class EngineRun:
    """What a measured engine run used and did."""

    peak_bytes: int
    loaded_bytes: int
    n_ctx: int
    n_ctx_seq: int
    prompt_tokens: int
    decode_tok_s: float | None


def _status() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _run(args: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "qwenkit.catalog.measure", *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise MeasureError(
            f"the measurement ran past {timeout:.0f} s: measure a smaller configuration"
        ) from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MeasureError(f"the measurement process failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_runtime_baseline(gguf: Path, timeout: float = 120) -> RuntimeBaseline:
    """Measure the engine process's baseline with `gguf`'s vocabulary (see the module docstring)."""
    out = _run(["baseline", str(gguf)], timeout)
    return RuntimeBaseline(out["steady"], out["peak"], "measured on this machine")


def measure_engine_run(
    gguf: Path,
    *,
    n_ctx: int,
    max_seqs: int,
    kv_type: str = "f16",
    flash_attn: bool | None = None,
    threads: int | None = None,
    n_batch: int = 512,
    fill: bool = True,
    new_tokens: int = 8,
    decode_tokens: int = 0,
    timeout: float = 600,
) -> EngineRun:
    """Peak RSS of LlamaCppEngine running this configuration (see the module docstring)."""
    config = {
        "n_ctx": n_ctx,
        "max_seqs": max_seqs,
        "kv_type": kv_type,
        "flash_attn": flash_attn,
        "n_batch": n_batch,
        "n_ubatch": n_batch,
    }
    if threads:
        config["threads"] = threads
    workload = {"fill": fill, "new_tokens": new_tokens, "decode_tokens": decode_tokens}
    out = _run(["run", str(gguf), json.dumps(config), json.dumps(workload)], timeout)
    return EngineRun(**out)


def _baseline_key() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        llama = version("llama-cpp-python")
    except PackageNotFoundError:
        llama = "missing"
    return {"python": platform.python_version(), "llama_cpp": llama, "qwenkit": version("qwenkit")}


QWEN2_VOCAB = 152064  # the largest Qwen2/Qwen2.5/Qwen3 vocabulary (padded embedding rows)


def cached_runtime_baseline(
    env: Mapping[str, str] | None = None, refresh: bool = False, vocab: int | None = None
) -> RuntimeBaseline:
    """This machine's measured baseline for a model with `vocab` tokens (default: Qwen2/Qwen3's), from the
    qwenkit cache or measured now (about two seconds; a first Qwen3.5-vocabulary one builds a tiny demo)."""
    qwen3_5 = vocab is not None and vocab > QWEN2_VOCAB
    name = "runtime-baseline-qwen3_5.json" if qwen3_5 else "runtime-baseline.json"
    path = cache_root(env) / "planner" / name
    key = _baseline_key()
    if not refresh:
        try:
            saved = json.loads(path.read_text("utf-8"))
            if saved.get("key") == key:
                return RuntimeBaseline(**saved["baseline"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    baseline = measure_runtime_baseline(_qwen3_5_vocab_gguf(env) if qwen3_5 else _default_vocab_gguf(env))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "baseline": asdict(baseline)}, indent=2) + "\n", "utf-8")
    os.replace(tmp, path)
    return baseline


def _default_vocab_gguf(env: Mapping[str, str] | None) -> Path:
    from qwenkit.checkpoints.demo import ensure_default_demo
    from qwenkit.gguf.convert import ensure_gguf

    # Every Qwen2/Qwen2.5/Qwen3 model shares this vocabulary, so the demo's GGUF stands for all of them.
    return ensure_gguf(ensure_default_demo(env), "q8_0", env=env)


def _qwen3_5_vocab_gguf(env: Mapping[str, str] | None) -> Path:
    from qwenkit.checkpoints.demo import DemoArch, DemoSize, create_demo, is_demo_checkpoint
    from qwenkit.gguf.convert import convert_to_gguf

    root = cache_root(env) / "planner"
    out = root / "qwen3_5-tiny-q8_0.gguf"
    if not out.is_file():
        ckpt = root / "qwen3_5-tiny"
        if not is_demo_checkpoint(ckpt):
            create_demo(ckpt, arch=DemoArch.QWEN3_5, size=DemoSize.TINY)
        tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.gguf")
        convert_to_gguf(ckpt, tmp, "q8_0")
        os.replace(tmp, out)
    return out


# ---- the subprocess side ---------------------------------------------------------------------------
def _child_baseline(gguf: str) -> dict[str, int]:
    import ctypes

    import llama_cpp

    import qwenkit.engines.llamacpp.engine  # noqa: F401  (the imports an engine process has)
    from qwenkit.gguf.reader import read_gguf_info

    @llama_cpp.llama_log_callback
    def quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        pass

    read_gguf_info(Path(gguf))  # LlamaModel reads the metadata first, as here
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(gguf.encode(), params)
    if not model:
        raise SystemExit(f"llama.cpp could not load the vocabulary of {gguf}")
    status = _status()
    return {"steady": status["VmRSS"], "peak": status["VmHWM"]}


def _prompt(seed: int, n: int) -> tuple[int, ...]:
    # Ordinary (non-special) token ids, different per request so no prefix is shared.
    return tuple(1000 + (seed * 7919 + j * 104729) % 100000 for j in range(n))


def _child_run(gguf: str, config: dict[str, Any], workload: dict[str, Any]) -> dict[str, Any]:
    from qwenkit.engines.llamacpp.config import EngineConfig
    from qwenkit.engines.llamacpp.engine import LlamaCppEngine
    from qwenkit.engines.request import GenerationRequest
    from qwenkit.engines.sampling import SamplingParams

    engine = LlamaCppEngine(Path(gguf), EngineConfig(**config))
    loaded = _status()["VmRSS"]
    new = int(workload["new_tokens"])
    greedy = SamplingParams(temperature=0.0, max_tokens=new)

    def drain(requests: list[GenerationRequest]) -> None:
        for r in requests:
            engine.submit(r, lambda event: None)
        while engine.step():
            pass

    decode_tok_s = None
    if workload["decode_tokens"]:
        n = int(workload["decode_tokens"])
        request = GenerationRequest(
            "decode", _prompt(0, 8), SamplingParams(temperature=0.0, max_tokens=n), ignore_eos=True
        )
        engine.submit(request, lambda event: None)
        engine.step()  # prefill and first token
        start = time.perf_counter()
        steps = 0
        while engine.step():
            steps += 1
        decode_tok_s = steps / (time.perf_counter() - start) if steps else None
    # Every slot busy at once: the output buffer and per-sequence KV streams in use.
    drain(
        [
            GenerationRequest(f"s{i}", _prompt(i + 1, 32), greedy, ignore_eos=True)
            for i in range(engine.config.max_seqs)
        ]
    )
    prompt_tokens = 0
    if workload["fill"]:
        # Alone, a long prompt is prefilled in n_batch chunks; the last attends over the whole context.
        prompt_tokens = engine.n_ctx - new
        drain([GenerationRequest("fill", _prompt(999, prompt_tokens), greedy, ignore_eos=True)])
    status = _status()
    return {
        "peak_bytes": status["VmHWM"],
        "loaded_bytes": loaded,
        "n_ctx": engine.model.n_ctx,
        "n_ctx_seq": engine.n_ctx,
        "prompt_tokens": prompt_tokens,
        "decode_tok_s": decode_tok_s,
    }


def _main(argv: list[str]) -> None:
    if argv[:1] == ["baseline"] and len(argv) == 2:
        print(json.dumps(_child_baseline(argv[1])))
    elif argv[:1] == ["run"] and len(argv) == 4:
        print(json.dumps(_child_run(argv[1], json.loads(argv[2]), json.loads(argv[3]))))
    else:
        raise SystemExit("usage: python -m qwenkit.catalog.measure baseline GGUF | run GGUF CONFIG WORKLOAD")


if __name__ == "__main__":
    _main(sys.argv[1:])
