"""Ray Serve's request router for qwenkit's engine replicas: least loaded, exactly (imports Ray).

Contract: LeastLoadedRouter offers every available replica as one rank, so Serve's own selection (probe
each candidate's queue length, take the lowest that accepts) sends a request to the replica with the
fewest requests in flight, rather than to the better of two random ones (Serve's default). Serve loads
it by its import path, ROUTER_PATH.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTER_PATH = "qwenkit.engines.ray_router:LeastLoadedRouter"


class LeastLoadedRouter(RequestRouter):  # type: ignore[misc]
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        return [list(candidate_replicas)] if candidate_replicas else []


__all__ = ["ROUTER_PATH", "LeastLoadedRouter"]
