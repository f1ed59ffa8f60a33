"""Bounded admission: how many requests this router lets wait on each pool at once, shared fairly between tenants,
and only as many as can start before their deadline.

Three checks per pool, each a RESOURCE_EXHAUSTED (HTTP 429) with a retry-after when it refuses:
  - the bound: at most max_queued_requests admitted and not yet given their first token by the pool;
  - fair share: while more than one tenant contends for a pool (has requests queued there, or was refused there
    in the last CONTENTION_WINDOW_S), a tenant may hold at most ceil(max_queued_requests / contenders) of it, so a
    tenant that fills the queue is refused before the others are;
  - queue time: the wait for a first token is estimated by Little's law, W = (L + 1) / throughput, with L the
    requests queued on the pool ahead of this one and the throughput measured from the intervals between first
    tokens while the pool was busy (an EWMA; at least the time since the last one, so a pool that slows down is
    seen before its next first token). A request whose budget (its deadline, or max_queue_time_s when it
    has none or the limit is tighter) is shorter than the largest estimate over its pools is refused at once
    instead of waiting past its deadline in a queue. (The largest, not the sum: a disaggregated request counts
    against the decode pool from arrival, so that pool's wait already holds the prefill's.) An empty pool always
    admits (W = 0: nothing is ahead), so a pessimistic estimate is corrected by the next first token instead of
    refusing forever.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

import grpc

from router.errors import RouterError

# A tenant refused on a pool counts as contending for it this long.
CONTENTION_WINDOW_S = 5.0
# Weight of the newest interval between first tokens in the throughput estimate.
EWMA_ALPHA = 0.2
# First tokens measured before the queue-time estimate is used.
MIN_SAMPLES = 4


class _PoolQueue:
    def __init__(self):
        self.by_tenant: Counter[str] = Counter()
        self.total = 0
        self.refused_at: dict[str, float] = {}  # tenant -> last refusal for a full pool
        self.interval_s: float | None = None  # EWMA of the time between first tokens while busy
        self.num_samples = 0
        self.last_event_at = 0.0  # the last release, or when the pool became busy

    def contenders(self, tenant: str, now: float) -> int:
        active = {t for t, n in self.by_tenant.items() if n > 0}
        active.update(t for t, at in self.refused_at.items() if now - at < CONTENTION_WINDOW_S)
        active.add(tenant)
        return len(active)

    def wait_s(self, now: float) -> float | None:
        if self.num_samples < MIN_SAMPLES:
            return None
        if not self.total:
            return 0.0
        return (self.total + 1) * max(self.interval_s, now - self.last_event_at)


class Admission:
    """Counts, per pool and tenant, the requests admitted here that have not yet had their first token from that
    pool. A request is admitted to every pool it will need at once, or to none, so it is never turned away halfway.
    `max_queue_time_s` (0: none) bounds the estimated queue time of requests, with or without a deadline.
    """

    def __init__(self, pools: tuple[str, ...], max_queued: int, max_queue_time_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_queued = max_queued
        self.max_queue_time_s = max_queue_time_s
        self._clock = clock
        self._pools = {pool: _PoolQueue() for pool in pools}

    def num_queued(self, pool: str) -> int:
        return self._pools[pool].total

    def estimated_wait_s(self, pool: str) -> float | None:
        """Seconds a request admitted now would wait for its first token from `pool`; None: not measured yet."""
        return self._pools[pool].wait_s(self._clock())

    def admit(self, pools: tuple[str, ...], tenant: str = "", time_remaining_s: float | None = None) -> None:
        now = self._clock()
        wait_s = 0.0
        for pool in pools:
            q = self._pools[pool]
            estimate = q.wait_s(now)
            if q.total >= self.max_queued:
                q.refused_at[tenant] = now
                raise RouterError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{pool} pool: {q.total} requests queued, the limit is max_queued_requests={self.max_queued}; "
                    "retry later", retry_after_s=q.interval_s or 1.0)
            share = math.ceil(self.max_queued / q.contenders(tenant, now))
            if q.by_tenant[tenant] >= share:
                raise RouterError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{pool} pool: tenant {tenant!r} holds {q.by_tenant[tenant]} of max_queued_requests="
                    f"{self.max_queued} while other tenants wait; its fair share is {share}; retry later",
                    retry_after_s=q.interval_s or 1.0)
            wait_s = max(wait_s, estimate or 0.0)
        budgets = [b for b in (time_remaining_s, self.max_queue_time_s or None) if b is not None]
        if budgets and wait_s > min(budgets):
            budget = min(budgets)
            raise RouterError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"overloaded: the estimated queue time is {wait_s:.2f} s, longer than the request's "
                f"{'deadline' if budget == time_remaining_s else 'max_queue_time_s'} ({budget:.2f} s); retry later",
                retry_after_s=wait_s - budget)
        for pool in pools:
            q = self._pools[pool]
            if q.total == 0:
                q.last_event_at = now
            q.total += 1
            q.by_tenant[tenant] += 1

    def release(self, pool: str, tenant: str = "", first_token: bool = True) -> None:
        """The request left the pool's queue: with its first token from it (measured), or ended before."""
        q = self._pools[pool]
        q.total -= 1
        q.by_tenant[tenant] -= 1
        if q.by_tenant[tenant] <= 0:
            del q.by_tenant[tenant]
        if first_token:
            now = self._clock()
            interval = now - q.last_event_at
            q.interval_s = interval if q.interval_s is None else (1 - EWMA_ALPHA) * q.interval_s + EWMA_ALPHA * interval
            q.num_samples += 1
            q.last_event_at = now
