"""kvfs.tasks.run_in_thread: blocking work in trio's worker threads for the read path. It returns the
function's result or raises its exception, never runs more at once than its limiter allows, and is not
abandoned by a cancellation (the thread may be filling the caller's buffer)."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from kvfs.tasks import run_in_thread


def test_result_and_exception_come_back_from_another_thread():
    async def main():
        limiter = trio.CapacityLimiter(2)
        ident = await run_in_thread(threading.get_ident, limiter=limiter)
        assert ident != threading.get_ident()
        assert await run_in_thread(divmod, 17, 5, limiter=limiter) == (3, 2)
        with pytest.raises(FileNotFoundError):
            await run_in_thread(open, "/nonexistent/kvfs-test", limiter=limiter)

    trio.run(main)


def test_the_limiter_bounds_threads_at_once():
    running = peak = 0
    lock = threading.Lock()

    def work(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1
        return i * i

    async def main():
        limiter = trio.CapacityLimiter(3)
        results: dict[int, int] = {}

        async def one(i: int) -> None:
            results[i] = await run_in_thread(work, i, limiter=limiter)

        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(one, i)
        assert results == {i: i * i for i in range(12)}

    trio.run(main)
    assert 1 <= peak <= 3


def test_a_cancelled_caller_waits_for_its_thread():
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.2)
        finished.set()

    async def main():
        with trio.move_on_after(0.01) as scope:
            await run_in_thread(slow, limiter=trio.CapacityLimiter(1))
            assert finished.is_set()  # it returned only once the thread was done
            await trio.sleep(1)  # the cancellation comes at the next checkpoint
        assert scope.cancel_called and scope.cancelled_caught

    trio.run(main)
