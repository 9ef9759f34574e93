"""Requests on their way to an engine, so that a burst of them starts in one step.

Contract: the server calls Arrivals.enter() once a generating request's body has arrived and leave() on the
returned Arrival right before it submits (or when it answers without the engine; leave() is idempotent).
An engine given the Arrivals (watch_arrivals) may, when it goes from idle to busy, wait up to a few
milliseconds while pending() > 0: without that, a burst of 16 requests arriving within 10 ms starts with a
step of the first one or three prompts (~200 ms of prefill), and every other request waits behind it.
Thread-safe: enter/leave run on the event loop, pending() on the engine thread.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable


class Arrival:
    """One request on its way; leave() once it is submitted or answered (again: no effect)."""

    def __init__(self, arrivals: Arrivals) -> None:
        self._arrivals: Arrivals | None = arrivals

    def leave(self) -> None:
        if self._arrivals is not None:
            self._arrivals._left()
            self._arrivals = None

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()


class Arrivals:
    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def enter(self) -> Arrival:
        with self._lock:
            self._n += 1
        return Arrival(self)

    def _left(self) -> None:
        with self._lock:
            self._n -= 1

    def pending(self) -> int:
        """Requests entered and not yet left."""
        return self._n


@runtime_checkable
class WatchesArrivals(Protocol):
    """An engine that can gather a burst: it reads arrivals.pending() when it goes from idle to busy."""

    def watch_arrivals(self, arrivals: Arrivals) -> None: ...
