"""Run a benchmark: `run_bench(BenchConfig) -> BenchReport` against one or more OpenAI-compatible servers.

Before any measured request every endpoint is checked (GET /v1/models; its first id is the model unless
one is given): an unreachable one raises BenchError and nothing runs. Then each endpoint gets --warmup
requests (not counted), and each level (a concurrency, closed loop; or a request rate, Poisson arrivals)
runs num_requests streaming requests per endpoint per round, endpoints alternating within a level
(A, B, A, B ... for `rounds`), so drifting machine load hits each alike; rounds are pooled per level.
Requests are greedy with max_tokens = output_len and ignore_eos; prompts are plain words of ~input_len
tokens, unique per request, round and endpoint (no prefix a server, or two endpoints in front of one
server, could answer from a cache).
Failed requests (4xx/5xx, dropped connections) are counted per level by kind and the run goes on.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, SecretStr, model_validator

from qwenkit import __version__
from qwenkit.bench import metrics
from qwenkit.bench.client import Endpoint, RequestRecord, get_json, stream_request
from qwenkit.bench.prompts import builtin_text_maker

Percentiles = dict[str, float | None]
Progress = Callable[[int, int], None]
API_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class BenchError(ValueError):
    """A benchmark that cannot start (unreachable endpoint, no model): one line naming the fix."""


class BenchConfig(BaseModel):
    """What to measure. `base_url` is the first endpoint, `compare` the others (labels in the same order)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str
    compare: list[str] = Field(default_factory=list)
    labels: list[str] = Field(default_factory=list)
    model: str | None = None
    api_key: SecretStr | None = Field(default=None, exclude=True)
    endpoint: Literal["completions", "chat"] = "completions"
    concurrency: list[PositiveInt] = Field(default_factory=lambda: [1])
    request_rate: list[PositiveFloat] | None = None  # Poisson arrivals at each rate instead of concurrency
    num_requests: PositiveInt = 32
    input_len: PositiveInt = 128
    output_len: PositiveInt = 128
    slo_ttft: PositiveFloat | None = None
    slo_itl: PositiveFloat | None = None
    warmup: int = Field(default=2, ge=0)
    rounds: PositiveInt = 1
    seed: int = 0
    timeout: PositiveFloat = 600.0
    ignore_eos: bool = True

    @model_validator(mode="after")
    def _check(self) -> BenchConfig:
        if len(self.labels) > len(self.urls):
            raise ValueError(f"{len(self.labels)} labels for {len(self.urls)} endpoints: give one per URL")
        if not self.concurrency and not self.request_rate:
            raise ValueError("give at least one concurrency level or request rate")
        return self

    @property
    def urls(self) -> list[str]:
        return [self.base_url, *self.compare]

    @property
    def mode(self) -> Literal["concurrency", "rate"]:
        return "rate" if self.request_rate else "concurrency"


class EndpointInfo(BaseModel):
    label: str
    url: str
    model: str
    server: str | None = None  # the Server header of GET /v1/models


class RequestSample(BaseModel):
    """One measured request, as in results.json."""

    round: int
    ttft_s: float | None
    e2e_s: float
    tokens: int
    chunks: int
    prompt_tokens: int | None
    error: str | None


class LevelResult(BaseModel):
    """One endpoint at one level (a concurrency or a request rate), its rounds pooled."""

    endpoint: str
    url: str
    model: str
    concurrency: int | None
    request_rate: float | None
    rounds: int
    requests: int
    completed: int
    failed: int
    failures: dict[str, int]
    no_content: int  # completed requests whose stream carried no content (TTFT at their first chunk)
    output_tokens: int
    tokens_source: Literal["usage", "chunks"]
    prompt_tokens_mean: float | None
    ttft: Percentiles
    itl: Percentiles
    e2e: Percentiles
    output_tok_s: float
    output_tok_s_rounds: list[float]
    request_throughput: float
    goodput: float
    goodput_fraction: float | None
    wall_s: float
    client_cpu_share: float
    samples: list[RequestSample]

    @property
    def x(self) -> float:
        """The level's value: its concurrency, or its request rate."""
        return float(self.concurrency if self.concurrency is not None else self.request_rate or 0.0)


class BenchReport(BaseModel):
    config: BenchConfig
    endpoints: list[EndpointInfo]
    levels: list[LevelResult]
    definitions: dict[str, str]
    machine: dict[str, Any]
    versions: dict[str, str | None]
    started_at: str
    finished_at: str

    def level(
        self, endpoint: str | None = None, concurrency: int | None = None, request_rate: float | None = None
    ) -> LevelResult:
        """The level of this endpoint label (default: the first) at this concurrency or request rate."""
        label = endpoint or self.endpoints[0].label
        for lv in self.levels:
            if lv.endpoint != label:
                continue
            if concurrency in (None, lv.concurrency) and request_rate in (None, lv.request_rate):
                return lv
        raise KeyError(f"no level for {label} at concurrency={concurrency} request_rate={request_rate}")


def endpoint_labels(urls: Sequence[str], labels: Sequence[str]) -> list[str]:
    """The given labels, then host:port for the rest; a repeated label gets ' #2', ' #3'."""
    out: list[str] = []
    for i, url in enumerate(urls):
        base = labels[i] if i < len(labels) else Endpoint.parse(url).label
        label, n = base, 1
        while label in out:
            n += 1
            label = f"{base} #{n}"
        out.append(label)
    return out


def check_endpoint(endpoint: Endpoint, model: str | None) -> tuple[str, str | None]:
    """(model id, Server header); BenchError when the server cannot be reached or names no model."""
    try:
        status, body, server = get_json(endpoint, "/v1/models")
    except OSError as exc:
        raise BenchError(f"cannot reach {endpoint.url}: {exc} (is the server running?)") from None
    if status in (401, 403):
        raise BenchError(f"{endpoint.url} answered {status} to GET /v1/models: pass the server's --api-key")
    if model is not None:
        return model, server
    ids = [m.get("id") for m in (body or {}).get("data", []) if isinstance(m, dict)] if status == 200 else []
    if not ids or not isinstance(ids[0], str):
        raise BenchError(f"{endpoint.url} lists no model at /v1/models (HTTP {status}): pass --model")
    return ids[0], server


def _payload(config: BenchConfig, model: str, prompt: str) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": model}
    if config.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    payload |= {
        "max_tokens": config.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        payload["ignore_eos"] = True
    return payload


def arrival_offsets(n: int, rate: float, seed: str) -> list[float]:
    """Send times (seconds from the start) of n Poisson arrivals at `rate` per second: the first at 0,
    then exponential gaps of mean 1/rate, the same for a given seed."""
    rng = random.Random(f"{seed}/arrivals")
    return list(itertools.accumulate((rng.expovariate(rate) for _ in range(n - 1)), initial=0.0))


class _Runner:
    def __init__(self, config: BenchConfig, progress: Progress | None) -> None:
        self.config = config
        self.api_path = API_PATHS[config.endpoint]
        self.make_text = builtin_text_maker()
        self.progress = progress
        self.levels: list[tuple[int | None, float | None]] = [(c, None) for c in config.concurrency]
        if config.request_rate:
            self.levels = [(None, r) for r in config.request_rate]
        n_endpoints = len(config.urls)
        self.total = n_endpoints * (config.warmup + len(self.levels) * config.rounds * config.num_requests)
        self.done = 0

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def prompt(self, tag: str, i: int) -> str:
        head = f"request {i} of run {self.config.seed}.{tag}: "  # unique first words: no cached prefix
        return head + self.make_text(f"{self.config.seed}/{tag}/{i}", self.config.input_len)

    def payloads(self, model: str, tag: str, n: int) -> list[dict[str, Any]]:
        """The n requests of a run, built before its clock starts (their CPU is not the load generator's)."""
        return [_payload(self.config, model, self.prompt(tag, i)) for i in range(n)]

    async def one(self, endpoint: Endpoint, payload: dict[str, Any]) -> RequestRecord:
        record = await stream_request(endpoint, self.api_path, payload, self.config.timeout)
        self.tick()
        return record

    async def closed_loop(
        self, endpoint: Endpoint, payloads: list[dict[str, Any]], concurrency: int
    ) -> list[RequestRecord]:
        """The requests, at most `concurrency` in flight: each worker sends its next as its last ends."""
        n = len(payloads)
        records: list[RequestRecord | None] = [None] * n
        todo = iter(range(n))

        async def worker() -> None:
            for i in todo:
                records[i] = await self.one(endpoint, payloads[i])

        await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
        return [r for r in records if r is not None]

    async def poisson(
        self, endpoint: Endpoint, payloads: list[dict[str, Any]], rate: float, seed: str
    ) -> list[RequestRecord]:
        """The requests sent at Poisson arrivals of `rate` per second, whatever is in flight."""
        offsets = arrival_offsets(len(payloads), rate, seed)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks = []
        for payload, offset in zip(payloads, offsets, strict=True):
            await asyncio.sleep(max(0.0, t0 + offset - loop.time()))
            tasks.append(asyncio.create_task(self.one(endpoint, payload)))
        return list(await asyncio.gather(*tasks))

    async def measure(
        self, endpoint: Endpoint, model: str, tag: str, level: tuple[int | None, float | None]
    ) -> tuple[list[RequestRecord], float, float]:
        """One round of one level: (records, wall seconds, this process's CPU seconds)."""
        concurrency, rate = level
        payloads = self.payloads(model, tag, self.config.num_requests)
        cpu0, t0 = time.process_time(), time.perf_counter()
        if rate is not None:
            # The schedule depends on the seed and level/round only: every endpoint gets the same one.
            records = await self.poisson(
                endpoint, payloads, rate, f"{self.config.seed}/{tag.rsplit('.', 1)[0]}"
            )
        else:
            records = await self.closed_loop(endpoint, payloads, concurrency or 1)
        end = max([r.end for r in records] + [t0])
        return records, end - t0, time.process_time() - cpu0

    async def run(self, endpoints: list[tuple[str, Endpoint, str]]) -> list[LevelResult]:
        cfg = self.config
        top = max(cfg.concurrency or [1])
        for _, endpoint, model in endpoints:
            if cfg.warmup:
                warm = await self.closed_loop(endpoint, self.payloads(model, "warmup", cfg.warmup), top)
                if not any(r.ok for r in warm):  # every request would fail the same way: stop now
                    kinds = ", ".join(f"{k} x{v}" for k, v in metrics.failures(warm).items())
                    detail = next((r.detail for r in warm if r.detail), None)
                    raise BenchError(
                        f"every warm-up request to {endpoint.url} failed ({kinds})"
                        + (f": {detail}" if detail else "")
                        + "; check --model, --endpoint and --api-key"
                    )
        results = []
        for li, level in enumerate(self.levels):
            runs: dict[str, list[tuple[int, list[RequestRecord], float, float]]] = {
                e[0]: [] for e in endpoints
            }
            for rnd in range(cfg.rounds):
                for ei, (label, endpoint, model) in enumerate(endpoints):  # alternating within the level
                    records, wall, cpu = await self.measure(endpoint, model, f"{li}.{rnd}.{ei}", level)
                    runs[label].append((rnd, records, wall, cpu))
            for label, endpoint, model in endpoints:
                results.append(self.level_result(label, endpoint, model, level, runs[label]))
        return results

    def level_result(
        self,
        label: str,
        endpoint: Endpoint,
        model: str,
        level: tuple[int | None, float | None],
        runs: list[tuple[int, list[RequestRecord], float, float]],
    ) -> LevelResult:
        records = [r for _, recs, _, _ in runs for r in recs]
        wall, cpu = sum(w for *_, w, _ in runs), sum(c for *_, c in runs)
        summary = metrics.summarize(records, wall, cpu, self.config.slo_ttft, self.config.slo_itl)
        per_round = [sum(r.tokens for r in recs if r.ok) / w if w > 0 else 0.0 for _, recs, w, _ in runs]
        samples = [
            RequestSample(
                round=rnd,
                ttft_s=metrics.ttft(r),
                e2e_s=r.end - r.sent,
                tokens=r.tokens,
                chunks=len(r.chunk_times),
                prompt_tokens=r.usage_prompt,
                error=r.error,
            )
            for rnd, recs, _, _ in runs
            for r in recs
        ]
        return LevelResult(
            endpoint=label,
            url=endpoint.url,
            model=model,
            concurrency=level[0],
            request_rate=level[1],
            rounds=len(runs),
            output_tok_s_rounds=per_round,
            samples=samples,
            **summary,  # type: ignore[arg-type]
        )


def machine_info() -> dict[str, Any]:
    from qwenkit import hardware

    mem = hardware.memory_info()
    return {
        "platform": platform.platform(),
        "cpu": hardware.cpu_model(),
        "physical_cores": hardware.physical_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_total_bytes": mem.total,
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"qwenkit": __version__, "python": sys.version.split()[0]}
    for package in ("numpy", "matplotlib"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def run_bench(config: BenchConfig, progress: Progress | None = None) -> BenchReport:
    """Check every endpoint, then measure them (module docstring); progress(done, total) per request."""
    key = config.api_key.get_secret_value() if config.api_key else None
    labels = endpoint_labels(config.urls, config.labels)
    endpoints, infos = [], []
    for label, url in zip(labels, config.urls, strict=True):
        endpoint = Endpoint.parse(url, key)
        model, server = check_endpoint(endpoint, config.model)
        endpoints.append((label, endpoint, model))
        infos.append(EndpointInfo(label=label, url=endpoint.url, model=model, server=server))
    started = datetime.now(UTC).isoformat(timespec="seconds")
    runner = _Runner(config, progress)
    levels = asyncio.run(runner.run(endpoints))
    return BenchReport(
        config=config,
        endpoints=infos,
        levels=levels,
        definitions={
            "ttft": "request sent -> first chunk with content (text, reasoning or tool call); in a stream "
            "with none (counted in no_content), its first chunk",
            "itl": "gaps between consecutive content chunks, pooled over a level's completed requests",
            "e2e": "request sent -> end of its stream",
            "output_tok_s": "tokens of completed requests / level wall time (first send -> last end), "
            "rounds pooled; tokens from usage.completion_tokens when sent, else content chunks",
            "goodput": metrics.GOODPUT_DEFINITION,
            "client_cpu_share": "this load generator's CPU seconds (time.process_time) per wall second",
            "prompts": "plain words sized with the built-in Qwen tokenizer, unique per request",
        },
        machine=machine_info(),
        versions=versions(),
        started_at=started,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
