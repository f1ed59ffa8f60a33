"""Stopping background asyncio tasks for certain, and timeouts that never eat a cancellation.

On Python < 3.12, `asyncio.wait_for` returns the inner result when the inner awaitable finishes in the same loop
iteration as the outer task is cancelled: the cancellation is lost (CPython gh-86296, fixed in 3.12 by rebuilding
`wait_for` on `asyncio.timeout`). A `while True` loop that awaits `wait_for` then never ends, and a `stop()` that
cancels it once and awaits it hangs. Hence `timeout` (the 3.11+ context manager, `async_timeout` before) for
timeouts inside loops, and `cancel_and_wait` for stopping them.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # redis-py depends on async-timeout before 3.11.3
    from async_timeout import timeout

__all__ = ["cancel_and_wait", "timeout"]

log = logging.getLogger(__name__)

# How often a task that is still running is cancelled again.
_RECANCEL_INTERVAL_S = 0.05


async def cancel_and_wait(*tasks: asyncio.Task | None, timeout_s: float = 5.0) -> bool:
    """Cancel `tasks` (None entries are skipped) and wait until they are done, cancelling again every 50 ms any
    that went on (a cancellation swallowed by `wait_for` or by the task's own code). Gives up after `timeout_s`
    seconds, logging what still runs. Returns whether every task is done. Never raises for the tasks' errors."""
    pending = {t for t in tasks if t is not None and not t.done()}
    deadline = time.monotonic() + timeout_s
    while pending:
        for t in pending:
            t.cancel()
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            log.warning("tasks still running %.1f s after cancel: %s", timeout_s,
                        ", ".join(t.get_name() for t in pending))
            return False
        _, pending = await asyncio.wait(pending, timeout=min(_RECANCEL_INTERVAL_S, left_s))
    for t in tasks:  # retrieve outcomes: no "exception was never retrieved" noise
        if t is not None and t.done() and not t.cancelled():
            t.exception()
    return True
