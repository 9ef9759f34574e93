"""Scale-out on CPUs: N llama.cpp engine replicas on Ray Serve behind one qwenkit endpoint (extra `ray`).

Contract: start_replicas() starts (or joins, with an address) a Ray cluster and deploys N EngineReplica
copies, each a LlamaCppEngine on the same GGUF; Ray Serve routes each request to the replica with the
fewest requests in flight (LeastLoadedRouter: every replica is a candidate, Serve probes their queue
lengths and picks the lowest). ReplicaEngine is the Engine the qwenkit server runs on: generate() streams
the chosen replica's TokenEvents; abort() cancels the stream, which closes the replica's generator and
so aborts the request there; stats() sums what the replicas report (refreshed at most every
STATS_TTL_S, off the caller's thread). The server's auth, limits, parsers and metrics stay in the one
front process. check_ray_address() fails in one line when no Ray cluster answers at an address.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from qwenkit.engines.checks import wait_drained
from qwenkit.engines.llamacpp.config import EngineConfig
from qwenkit.engines.request import EngineError, EngineStats, GenerationRequest, TokenEvent

APP_NAME = "qwenkit-replicas"
STATS_TTL_S = 1.0
CONNECT_TIMEOUT_S = 3.0


def check_ray_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ValueError (one line) unless something listens at a Ray address (host:port, ray://host:port)."""
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(
            f"--ray-address {address!r}: write host:port, e.g. 10.0.0.5:6379 (or ray://host:10001)"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ValueError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one there with "
            "`ray start --head --port 6379`, or leave out --ray-address to start one here"
        ) from None


class EngineReplica:
    """One Ray Serve replica: a started LlamaCppEngine (the class is wrapped by serve.deployment)."""

    def __init__(self, gguf_path: str, config: EngineConfig) -> None:
        from qwenkit.engines.llamacpp.engine import LlamaCppEngine

        self.engine = LlamaCppEngine(Path(gguf_path), config)
        self.engine.start()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        # Cancelled by the caller: closing engine.generate aborts the request in this engine.
        async for event in self.engine.generate(request):
            yield event

    def info(self) -> dict[str, Any]:
        return {"n_ctx": self.engine.n_ctx, "stats": self.engine.stats()}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.engine.shutdown(timeout=0)


class ReplicaEngine:
    """The Engine protocol over a Ray Serve deployment of EngineReplica (see start_replicas)."""

    def __init__(self, handle: Any, n_ctx: int, replicas: int, stop: Any = None) -> None:
        self._handle = handle
        self.n_ctx = n_ctx
        self.replicas = replicas
        self._stop = stop
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[Any, asyncio.AbstractEventLoop]] = {}
        self._aborted: set[str] = set()
        self._stats = EngineStats(0, 0, 0, 0, 0, 0)
        self._stats_at = 0.0
        self._accepting = True

    def start(self) -> None:
        """The replicas started in start_replicas(); nothing to do here."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        from ray.serve.exceptions import RequestCancelledError

        rid = request.request_id
        with self._lock:
            if not self._accepting:
                from qwenkit.engines.request import EngineOverloaded

                raise EngineOverloaded("the engine is shutting down")
            if rid in self._streams:
                raise EngineError(f"request id {rid!r} is already running")
            stream = self._handle.options(stream=True).generate.remote(request)
            self._streams[rid] = (stream, asyncio.get_running_loop())
        finished = False
        produced = 0
        try:
            async for event in stream:
                produced = event.completion_tokens
                finished = event.finished
                yield event
                if finished:
                    return
        except (RequestCancelledError, asyncio.CancelledError):
            if rid not in self._aborted:
                raise
        except EngineError:
            raise
        except Exception as exc:  # a replica's EngineError comes back wrapped by Ray
            cause = getattr(exc, "cause", None)
            if isinstance(cause, EngineError) and produced == 0:
                raise cause from None
            raise
        finally:
            with self._lock:
                self._streams.pop(rid, None)
                aborted = rid in self._aborted
                self._aborted.discard(rid)
            if not finished and not aborted:
                with contextlib.suppress(Exception):
                    stream.cancel()
        if not finished:  # aborted: the contract's final event
            prompt = len(request.prompt_token_ids)
            yield TokenEvent(rid, [], "", "abort", prompt_tokens=prompt, completion_tokens=produced)

    def abort(self, request_id: str) -> None:
        """Cancel the request's stream (from any thread); its replica aborts it in its engine."""
        with self._lock:
            found = self._streams.get(request_id)
            if found is None or request_id in self._aborted:
                return
            self._aborted.add(request_id)
        stream, loop = found
        loop.call_soon_threadsafe(stream.cancel)

    def stats(self) -> EngineStats:
        """In-flight requests now; the replicas' KV figures as of the last refresh (at most STATS_TTL_S)."""
        with self._lock:
            running = len(self._streams)
            stale = time.monotonic() - self._stats_at > STATS_TTL_S
            if stale:
                self._stats_at = time.monotonic()
            cached = self._stats
        if stale:
            threading.Thread(target=self._refresh, daemon=True).start()
        return EngineStats(
            running=running,
            waiting=0,
            kv_used=cached.kv_used,
            kv_total=cached.kv_total,
            steps=cached.steps,
            preemptions=cached.preemptions,
        )

    def _refresh(self) -> None:
        # Serve routes each call to one replica; asking `replicas` times reaches most of them.
        try:
            infos = [self._handle.info.remote().result(timeout_s=5) for _ in range(self.replicas)]
        except Exception:
            return
        stats = [i["stats"] for i in infos]
        total = EngineStats(
            running=0,
            waiting=0,
            kv_used=sum(s.kv_used for s in stats),
            kv_total=sum(s.kv_total for s in stats),
            steps=sum(s.steps for s in stats),
            preemptions=sum(s.preemptions for s in stats),
        )
        with self._lock:
            self._stats = total

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop admitting, wait for in-flight requests up to `timeout`, cancel the rest, stop the replicas."""
        with self._lock:
            self._accepting = False
        wait_drained(lambda: bool(self._streams), timeout, poll=0.05)
        with self._lock:
            left = list(self._streams)
        for rid in left:
            self.abort(rid)
        if self._stop is not None:
            self._stop()


def start_replicas(
    gguf_path: Path, config: EngineConfig, replicas: int, ray_address: str | None = None
) -> ReplicaEngine:
    """Deploy `replicas` llama.cpp engines on Ray Serve (a local Ray, or the cluster at ray_address)."""
    if replicas < 1:
        raise ValueError("--replicas must be at least 1")
    if ray_address is not None:
        check_ray_address(ray_address)
    try:
        import ray
        from ray import serve
        from ray.serve.config import RequestRouterConfig

        from qwenkit.engines.ray_router import ROUTER_PATH
    except ImportError:
        raise ValueError(
            "--replicas needs Ray Serve: install qwenkit's ray extra (or serve one engine without --replicas)"
        ) from None
    if not ray.is_initialized():
        local = {} if ray_address else {"num_cpus": replicas * config.threads}
        ray.init(
            address=ray_address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            **local,
        )
    serve.start(proxy_location="Disabled")  # the qwenkit server is the only endpoint
    deployment = serve.deployment(
        EngineReplica,
        name="engine",
        num_replicas=replicas,
        max_ongoing_requests=config.max_seqs + config.max_waiting,
        ray_actor_options={"num_cpus": config.threads},
        request_router_config=RequestRouterConfig(request_router_class=ROUTER_PATH),
    )
    handle = serve.run(deployment.bind(str(gguf_path), config), name=APP_NAME, route_prefix=None)
    n_ctx = handle.info.remote().result(timeout_s=300)["n_ctx"]

    def stop() -> None:
        with contextlib.suppress(Exception):
            serve.delete(APP_NAME)
        if ray_address is None:
            with contextlib.suppress(Exception):
                serve.shutdown()
                ray.shutdown()

    return ReplicaEngine(handle, n_ctx, replicas, stop)


__all__ = ["EngineReplica", "ReplicaEngine", "check_ray_address", "start_replicas"]
