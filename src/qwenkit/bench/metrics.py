"""Benchmark arithmetic on recorded requests: percentiles, inter-token gaps, goodput, one level's summary.

Definitions (also written into every report):
- TTFT: request sent -> first chunk carrying content (text, reasoning or a tool call); for a stream that
  carries none (a server's parser held all the text back) its first chunk, and the level counts it in
  `no_content` (llama-server and vLLM send a chat stream's first chunk with the first token).
- ITL: the gaps between consecutive content chunks of a request, pooled over the level's completed requests.
- E2E: request sent -> end of its stream.
- output tok/s: tokens received by completed requests / wall time of the level (first send -> last end);
  tokens are the server's `usage.completion_tokens` when it sends usage, else content chunks.
- goodput: completed requests whose TTFT <= slo_ttft and whose mean ITL (its time per output token after
  the first) <= slo_itl, per second of wall time; an SLO not given always holds.
Percentile dicts have p50, p90, p95, p99, mean and max (linear interpolation, as numpy); None when empty.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

import numpy as np

from qwenkit.bench.client import RequestRecord

PERCENTILES = (50, 90, 95, 99)
GOODPUT_DEFINITION = (
    "goodput = completed requests with TTFT <= slo_ttft and mean ITL (time per output chunk after the "
    "first) <= slo_itl, per second of the level's wall time; an SLO not given always holds"
)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p95/p99 (linear interpolation), mean and max of values; all None when there are none."""
    keys = [f"p{q}" for q in PERCENTILES] + ["mean", "max"]
    if len(values) == 0:
        return dict.fromkeys(keys)
    arr = np.asarray(values, dtype=float)
    out: dict[str, float | None] = {f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES}
    out["mean"] = float(arr.mean())
    out["max"] = float(arr.max())
    return out


def ttft(record: RequestRecord) -> float | None:
    first = record.chunk_times[0] if record.chunk_times else record.first_event
    return None if first is None else first - record.sent


def itl(record: RequestRecord) -> list[float]:
    """Gaps between consecutive content chunks of one request."""
    times = record.chunk_times
    return [b - a for a, b in itertools.pairwise(times)]


def mean_itl(record: RequestRecord) -> float | None:
    """A request's time per output chunk after the first; None with fewer than two chunks."""
    times = record.chunk_times
    return (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None


def is_good(record: RequestRecord, slo_ttft: float | None, slo_itl: float | None) -> bool:
    """Completed and within both SLOs (see GOODPUT_DEFINITION)."""
    if not record.ok:
        return False
    first, gap = ttft(record), mean_itl(record)
    if slo_ttft is not None and (first is None or first > slo_ttft):
        return False
    return slo_itl is None or gap is None or gap <= slo_itl


def failures(records: Sequence[RequestRecord]) -> dict[str, int]:
    """Failed requests counted by kind ("HTTP 500", "disconnected", ...)."""
    return dict(sorted(Counter(r.error for r in records if r.error is not None).items()))


def summarize(
    records: Sequence[RequestRecord],
    wall_s: float,
    cpu_s: float,
    slo_ttft: float | None = None,
    slo_itl: float | None = None,
) -> dict[str, object]:
    """One level's numbers from its requests (several rounds pooled: wall_s and cpu_s are their sums)."""
    done = [r for r in records if r.ok]
    tokens = sum(r.tokens for r in done)
    prompt = [r.usage_prompt for r in done if r.usage_prompt is not None]
    good = sum(is_good(r, slo_ttft, slo_itl) for r in records)
    wall = wall_s if wall_s > 0 else float("nan")
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "failures": failures(records),
        "no_content": sum(not r.chunk_times for r in done),
        "output_tokens": tokens,
        "tokens_source": "usage" if done and all(r.usage_completion is not None for r in done) else "chunks",
        "prompt_tokens_mean": float(np.mean(prompt)) if prompt else None,
        "ttft": percentiles([t for r in done if (t := ttft(r)) is not None]),
        "itl": percentiles([g for r in done for g in itl(r)]),
        "e2e": percentiles([r.end - r.sent for r in done]),
        "output_tok_s": tokens / wall,
        "request_throughput": len(done) / wall,
        "goodput": good / wall,
        "goodput_fraction": good / len(records) if records else None,
        "wall_s": wall_s,
        "client_cpu_share": cpu_s / wall,
    }
