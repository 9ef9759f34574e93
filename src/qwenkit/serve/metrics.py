"""Prometheus metrics for one server: its own CollectorRegistry, never the process-wide default.

Contract: ServeMetrics holds the counters and histograms the request path updates (requests by route and
status, rejected requests by reason, TTFT, inter-token latency, prompt and generated tokens) and reads
the engine's running/waiting sequences, KV usage, state cache and image encodes at scrape time, so
/metrics is never stale.
`route_label` keeps label cardinality bounded: unknown paths all count as "other".
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from qwenkit.engines.base import Engine

ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/files",
    "/v1/batches",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
    "/api/tags",
    "/api/show",
    "/api/version",
    "/v1/models",
    "/v1/presets",
    "/health",
    "/metrics",
)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5)


def route_label(path: str) -> str:
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}"
    for prefix in ("/v1/files/", "/v1/batches/"):  # ids (and /content, /cancel) under one label each
        if path.startswith(prefix):
            return prefix + "{id}"
    return "other"


class _EngineCollector(Collector):
    """Engine gauges, read from engine.stats() when Prometheus scrapes."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        yield GaugeMetricFamily("qwenkit_running_sequences", "Sequences being decoded", stats.running)
        yield GaugeMetricFamily("qwenkit_waiting_sequences", "Sequences waiting for a slot", stats.waiting)
        yield GaugeMetricFamily("qwenkit_kv_cache_used_tokens", "KV cells in use", stats.kv_used)
        yield GaugeMetricFamily("qwenkit_kv_cache_total_tokens", "KV cells in all", stats.kv_total)
        usage = stats.kv_used / stats.kv_total if stats.kv_total else 0.0
        yield GaugeMetricFamily("qwenkit_kv_cache_usage_ratio", "Fraction of KV cells in use", usage)
        yield CounterMetricFamily("qwenkit_engine_steps", "Engine decode steps", stats.steps)
        yield CounterMetricFamily("qwenkit_engine_preemptions", "Sequences preempted", stats.preemptions)
        yield GaugeMetricFamily(
            "qwenkit_state_cache_bytes", "Host memory held by saved sequence states", stats.state_cache_bytes
        )
        yield GaugeMetricFamily(
            "qwenkit_state_cache_entries", "Saved sequence states held", stats.state_cache_entries
        )
        yield CounterMetricFamily(
            "qwenkit_state_cache_hits", "Prompts started from a saved state", stats.state_cache_hits
        )
        yield CounterMetricFamily(
            "qwenkit_state_cache_evictions",
            "Saved states dropped to stay within --state-cache-mb",
            stats.state_cache_evictions,
        )
        yield CounterMetricFamily(
            "qwenkit_image_encodes",
            "Images run through the vision tower (not from a cached prefix)",
            stats.image_encodes,
        )
        if stats.threads:  # CPU engines: fewer than configured while other processes load the cores
            yield GaugeMetricFamily("qwenkit_engine_threads", "CPU threads decoding now", stats.threads)


class ServeMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "qwenkit_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.rejected = Counter(
            "qwenkit_rejected_requests", "Requests refused, by reason", ["reason"], registry=r
        )
        self.request_seconds = Histogram(
            "qwenkit_request_duration_seconds",
            "Request duration",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "qwenkit_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "qwenkit_inter_token_latency_seconds", "Time between tokens", buckets=_ITL_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("qwenkit_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("qwenkit_generation_tokens", "Tokens generated", registry=r)
        self.cached_prompt_tokens = Counter(
            "qwenkit_prompt_cached_tokens", "Prompt tokens reused from a cache, not computed", registry=r
        )
        # finish_reason per choice (length: cut by max_tokens), for /health?verbose=1's truncation check.
        self.finished = Counter(
            "qwenkit_finished_requests", "Finished choices by finish_reason", ["reason"], registry=r
        )
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
