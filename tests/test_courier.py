"""Courier: events from another thread reach asyncio queues in order, with one loop wake-up per flush."""

from __future__ import annotations

import asyncio
import threading

from qwenkit.engines.courier import Courier


def test_events_wait_for_flush_and_arrive_in_order_with_one_wakeup() -> None:
    courier = Courier()

    async def main() -> tuple[list[int], list[int], int]:
        loop = asyncio.get_running_loop()
        a: asyncio.Queue[int] = asyncio.Queue()
        b: asyncio.Queue[int] = asyncio.Queue()
        put_a, put_b = courier.sink(a), courier.sink(b)
        wakeups = 0
        original = loop.call_soon_threadsafe

        def counting(*args: object) -> object:
            nonlocal wakeups
            wakeups += 1
            return original(*args)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]

        def engine_thread() -> None:
            for i in range(5):
                put_a(i)
                put_b(10 + i)
            courier.flush()
            courier.flush()  # nothing pending: no wake-up

        thread = threading.Thread(target=engine_thread)
        thread.start()
        thread.join()
        got_a = [await a.get() for _ in range(5)]
        got_b = [await b.get() for _ in range(5)]
        return got_a, got_b, wakeups

    got_a, got_b, wakeups = asyncio.run(main())
    assert got_a == [0, 1, 2, 3, 4] and got_b == [10, 11, 12, 13, 14]
    assert wakeups == 1


def test_nothing_is_delivered_before_flush() -> None:
    courier = Courier()

    async def main() -> bool:
        queue: asyncio.Queue[int] = asyncio.Queue()
        courier.sink(queue)(1)
        await asyncio.sleep(0.01)
        return queue.empty()

    assert asyncio.run(main())


def test_flush_after_the_loop_closed_is_harmless() -> None:
    courier = Courier()
    puts = []

    async def main() -> None:
        puts.append(courier.sink(asyncio.Queue()))

    asyncio.run(main())
    puts[0](1)
    courier.flush()  # the loop is closed: dropped without an error
