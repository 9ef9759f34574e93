"""Grammar-constrained decoding speed, side by side with unconstrained decoding (issue 10, item 5).

    python benchmarks/grammar.py            # random-weight model in the exact Qwen2.5-0.5B shape, q4_0
    python benchmarks/grammar.py --quick    # the tiny demo model, one round: a smoke run

One engine, one stream, the same prompts and sampling parameters on both sides: decode tok/s of a
--new-tokens answer under response_format json_schema {"type":"object","properties":{"text":{"type":
"string"}}} vs the same request unconstrained (goal: >= 0.8x). Rounds alternate the two sides and each
round runs --prompts different prompts; a side's tok/s is its tokens after the first over the time from
first to last token, summed over a round (time to first token is the prompt's, not sampling's). Also
reports how often the grammar had to be applied to the whole vocabulary (a rejected first pick).
The schema gets "minLength" (4 characters per token) and "required": a random-weight model left free
answers "{}" (its first resampled token), while a real model writes its answer into the string; this
keeps the random one there too, so the answer is --new-tokens long like the real one's.
Writes benchmarks/results/grammar-*.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_model, machine, median, write_results

from qwenkit.engines.grammar import grammar_from_json_schema
from qwenkit.engines.llamacpp import engine as engine_module
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.llamacpp.engine import LlamaCppEngine
from qwenkit.engines.llamacpp.sampler import SeqSampler
from qwenkit.engines.request import GenerationRequest, Grammar, TokenEvent
from qwenkit.engines.sampling import SamplingParams


def schema(new_tokens: int) -> dict[str, Any]:
    text = {"type": "string", "minLength": 4 * new_tokens}
    return {"type": "object", "properties": {"text": text}, "required": ["text"]}


PROMPT_LEN = 32


class CountingSampler(SeqSampler):
    """Keeps each finished sampler's grammar counters (the engine frees samplers as requests end)."""

    finished: ClassVar[list[tuple[int, int]]] = []

    def free(self) -> None:
        CountingSampler.finished.append((self.grammar_checks, self.grammar_full_passes))
        super().free()


def prompt(i: int) -> tuple[int, ...]:
    return tuple(1000 + (i * 7919 + j * 104729) % 100000 for j in range(PROMPT_LEN))


def one_answer(
    engine: LlamaCppEngine, rid: str, ids: tuple[int, ...], params: SamplingParams, grammar: Grammar | None
) -> tuple[int, float]:
    """(tokens after the first, seconds from the first token to the last) of one request."""
    times: list[float] = []
    done = threading.Event()

    def sink(ev: TokenEvent) -> None:
        times.extend([time.perf_counter()] * len(ev.token_ids))
        if ev.finished:
            done.set()

    engine.submit(GenerationRequest(rid, ids, params, grammar=grammar), sink)
    done.wait()
    return max(len(times) - 1, 0), (times[-1] - times[0]) if len(times) > 1 else 0.0


def side(
    engine: LlamaCppEngine, tag: str, params: SamplingParams, grammar: Grammar | None, n_prompts: int
) -> dict[str, float]:
    tokens = seconds = 0.0
    lengths = []
    for i in range(n_prompts):
        n, dt = one_answer(engine, f"{tag}-{i}", prompt(i), params, grammar)
        tokens, seconds = tokens + n, seconds + dt
        lengths.append(n + 1)
    return {
        "tok_s": tokens / seconds if seconds else float("nan"),
        "mean_answer_tokens": sum(lengths) / len(lengths),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny demo model, one round, two prompts")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quant", default="q4_0")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; each side's best kept")
    ap.add_argument("--prompts", type=int, default=4, help="requests per side per round")
    ap.add_argument("--new-tokens", type=int, default=150)
    args = ap.parse_args()
    from qwenkit.hardware import physical_cores

    threads = args.threads or physical_cores()
    arch, size = ("qwen3", "tiny") if args.quick else ("qwen2", "0.5b")
    rounds, n_prompts = (1, 2) if args.quick else (args.rounds, args.prompts)
    model_path = bench_model(arch, size, "q8_0" if args.quick else args.quant)
    grammar = grammar_from_json_schema(schema(args.new_tokens), after_think=False)
    modes = {
        # Qwen's non-thinking defaults (what the server uses when a client sends nothing) and greedy.
        "sampled": SamplingParams(temperature=0.7, top_p=0.8, top_k=20, seed=1, max_tokens=args.new_tokens),
        "greedy": SamplingParams(temperature=0.0, max_tokens=args.new_tokens),
    }
    engine_module.SeqSampler = CountingSampler  # type: ignore[misc]
    engine = LlamaCppEngine(model_path, EngineConfig(n_ctx=1024, max_seqs=1, threads=threads))
    engine.start()
    results: dict[str, Any] = {}
    try:
        side(engine, "warmup", modes["sampled"], grammar, 1)
        for mode, params in modes.items():
            free_rounds, schema_rounds = [], []
            CountingSampler.finished.clear()
            for r in range(rounds):
                free_rounds.append(side(engine, f"{mode}-free-{r}", params, None, n_prompts))
                schema_rounds.append(side(engine, f"{mode}-schema-{r}", params, grammar, n_prompts))
            checks = sum(c for c, _ in CountingSampler.finished)
            passes = sum(p for _, p in CountingSampler.finished)
            best_free = max(r["tok_s"] for r in free_rounds)
            best_schema = max(r["tok_s"] for r in schema_rounds)
            results[mode] = {
                "params": params.model_dump(),
                "unconstrained_tok_s": best_free,
                "json_schema_tok_s": best_schema,
                "ratio": best_schema / best_free,
                "ratio_paired_median": median(
                    [s["tok_s"] / f["tok_s"] for s, f in zip(schema_rounds, free_rounds, strict=True)]
                ),
                "goal": 0.8,
                "full_vocab_grammar_passes_per_token": passes / checks if checks else float("nan"),
                "rounds": {"unconstrained": free_rounds, "json_schema": schema_rounds},
            }
    finally:
        engine.shutdown(timeout=5)
        engine_module.SeqSampler = SeqSampler  # type: ignore[misc]

    payload = {
        "model": {"path": str(model_path), "arch": arch, "size": size, "bytes": model_path.stat().st_size},
        "threads": threads,
        "machine": machine(),
        "schema": schema(args.new_tokens),
        "new_tokens": args.new_tokens,
        "rounds": rounds,
        "prompts_per_round": n_prompts,
        "modes": results,
    }
    table = Table(title=f"json_schema vs unconstrained decode tok/s: {model_path.name}, {threads} threads")
    for col in (
        "mode",
        "unconstrained",
        "json_schema",
        "ratio: best / paired median",
        "goal",
        "answer tokens",
        "full grammar passes / token",
    ):
        table.add_column(col)
    for mode, r in results.items():
        free_len = median([x["mean_answer_tokens"] for x in r["rounds"]["unconstrained"]])
        schema_len = median([x["mean_answer_tokens"] for x in r["rounds"]["json_schema"]])
        table.add_row(
            mode,
            f"{r['unconstrained_tok_s']:.1f}",
            f"{r['json_schema_tok_s']:.1f}",
            f"{r['ratio']:.2f} / {r['ratio_paired_median']:.2f}",
            ">= 0.8",
            f"{free_len:.0f} / {schema_len:.0f}",
            f"{r['full_vocab_grammar_passes_per_token']:.3f}",
        )
    write_results("grammar-quick" if args.quick else "grammar", payload, table)


if __name__ == "__main__":
    main()
