"""Handing events from an engine's thread to asyncio consumers: one loop wake-up per step, not per event.

Contract: Courier.sink(queue) gives a callback the engine thread may call for each event; events are held
until flush(), which the engine calls once at the end of every step, and then arrive in order on the
consumers' asyncio.Queues through a single call_soon_threadsafe per event loop. Waking the loop once per
token would cost a thread switch per token, taken from the cores the next decode is running on.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

E = TypeVar("E")


class _LoopMail:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, object]] = []


class Courier:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting = False  # any mail held: a step with nothing to deliver skips the lock and the scan
        self._mail: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopMail] = (
            weakref.WeakKeyDictionary()
        )

    def sink(self, queue: asyncio.Queue[E]) -> Callable[[E], None]:
        """A thread-safe callback that delivers to `queue` on the running event loop at the next flush()."""
        loop = asyncio.get_running_loop()
        with self._lock:
            mail = self._mail.get(loop)
            if mail is None:
                mail = self._mail[loop] = _LoopMail(loop)

        def put(event: E) -> None:
            with self._lock:
                mail.pending.append((queue, event))
                self._waiting = True

        return put

    def flush(self) -> None:
        """Wake each loop that has events waiting, once."""
        if not self._waiting:  # read without the lock: a put racing this flush is delivered by the next one
            return
        with self._lock:
            self._waiting = False
            ready = [(mail.loop, mail.pending) for mail in self._mail.values() if mail.pending]
            for mail in self._mail.values():
                mail.pending = []
        for loop, batch in ready:
            # A closed loop means its consumers are gone; their aborts are already queued.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, event in batch:
        queue.put_nowait(event)
