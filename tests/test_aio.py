"""Stopping background loops for certain: a loop that loses a cancellation (as `asyncio.wait_for` makes it on
Python < 3.12) still ends, and one that never ends does not hang its stop()."""
from __future__ import annotations

import asyncio

import pytest

from tandem.aio import cancel_and_wait, timeout


def test_a_loop_that_swallows_a_cancellation_is_cancelled_again():
    async def main():
        swallowed = 0

        async def loop():
            nonlocal swallowed
            while True:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    if swallowed < 2:  # what a lost cancellation looks like from outside: the loop goes on
                        swallowed += 1
                        continue
                    raise

        task = asyncio.create_task(loop())
        await asyncio.sleep(0)
        assert await cancel_and_wait(task, timeout_s=5.0)
        return task, swallowed

    task, swallowed = asyncio.run(main())
    assert task.cancelled() and swallowed == 2


def test_a_task_that_never_ends_gives_up_after_the_timeout():
    async def main():
        release = asyncio.Event()

        async def stubborn():
            while not release.is_set():
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    pass

        task = asyncio.create_task(stubborn(), name="stubborn")
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        done = await cancel_and_wait(task, None, timeout_s=0.3)
        waited_s = loop.time() - start
        release.set()
        await cancel_and_wait(task)
        return done, waited_s, task.done()

    done, waited_s, ended = asyncio.run(main())
    assert not done and 0.3 <= waited_s < 2.0 and ended


def test_errors_of_the_tasks_are_not_raised_and_finished_tasks_are_fine():
    async def main():
        async def fails():
            raise RuntimeError("boom")

        failed = asyncio.create_task(fails())
        await asyncio.sleep(0)
        return await cancel_and_wait(failed, None)

    assert asyncio.run(main())


def test_timeout_raises_timeout_error_and_passes_cancellation_through():
    async def main():
        with pytest.raises(asyncio.TimeoutError):
            async with timeout(0.01):
                await asyncio.sleep(10)

        async def waits():
            async with timeout(10):
                await asyncio.sleep(10)

        task = asyncio.create_task(waits())
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return task.cancelled()

    assert asyncio.run(main())


def test_a_loop_woken_as_it_is_cancelled_still_ends():
    """The race that `asyncio.wait_for` loses on Python < 3.12: the awaited event fires in the same loop iteration
    as the cancel. With `timeout` the loop ends every time."""
    async def trial() -> bool:
        wake = asyncio.Event()

        async def loop():
            while True:
                try:
                    async with timeout(0.05):
                        await wake.wait()
                except asyncio.TimeoutError:
                    pass
                wake.clear()

        task = asyncio.create_task(loop())
        await asyncio.sleep(0)
        wake.set()
        await asyncio.sleep(0)  # the event's waiter is woken, not yet run
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        task.cancel()  # clean up a loop that lost the cancellation (a failure)
        return task in done

    assert all(asyncio.run(trial()) for _ in range(20))
