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
  - finish time, for a request with a deadline: the wait above plus its expected output at the measured pace of
    the pool that decodes it (the last of its pools): min(max_tokens, the mean output length measured) tokens at
    FINISH_MARGIN times the measured time per output token (EWMAs of the requests that finished there; the margin
    covers the spread between requests and the load the request itself adds). A request that would still be
    decoding at its deadline is refused at once: admitted, it would only take a seat from one that can finish.
    RESOURCE_EXHAUSTED (retry later) when the wait makes it miss; DEADLINE_EXCEEDED when even its decoding alone
    would outlast the deadline (no retry can help).
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
# The finish-time estimate's factor on the mean time per output token (measured on this repo's overload benchmark:
# under a burst, admitted requests decoded up to ~20% slower than the mean of those before).
FINISH_MARGIN = 1.25
# How a request refused for a deadline it could never meet is told (DEADLINE_EXCEEDED, at admission).
DEADLINE_REFUSAL = "refused at admission"


class _PoolQueue:
    def __init__(self):
        self.by_tenant: Counter[str] = Counter()
        self.total = 0
        self.refused_at: dict[str, float] = {}  # tenant -> last refusal for a full pool
        self.interval_s: float | None = None  # EWMA of the time between first tokens while busy
        self.num_samples = 0
        self.last_event_at = 0.0  # the last release, or when the pool became busy
        # Requests that finished decoding here: EWMAs of their seconds per output token and output lengths.
        self.tpot_s: float | None = None
        self.output_len: float | None = None
        self.num_finished = 0

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

    def decode_s(self, max_tokens: int | None) -> float | None:
        """Expected seconds from the first token to the last; None: not measured yet."""
        if self.num_finished < MIN_SAMPLES:
            return None
        num_tokens = self.output_len if max_tokens is None else min(max_tokens, self.output_len)
        return max(num_tokens - 1, 0) * self.tpot_s * FINISH_MARGIN


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

    def admit(self, pools: tuple[str, ...], tenant: str = "", time_remaining_s: float | None = None,
              max_tokens: int | None = None) -> None:
        """Count a request against `pools` (the pool that decodes it last), or raise RESOURCE_EXHAUSTED with a
        retry-after; `time_remaining_s` is its deadline, `max_tokens` its output bound (None: none)."""
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
        decode_s = self._pools[pools[-1]].decode_s(max_tokens)
        if time_remaining_s is not None and decode_s is not None and decode_s > time_remaining_s:
            # Not a matter of load: even unqueued it would end after its deadline, so no retry could help.
            raise RouterError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{DEADLINE_REFUSAL}: at the measured pace ({self._pools[pools[-1]].tpot_s * 1e3:.0f} ms per token, "
                f"{FINISH_MARGIN:g}x margin) its output would take {decode_s:.2f} s, more than its deadline "
                f"({time_remaining_s:.2f} s); ask for fewer tokens or allow more time")
        if time_remaining_s is not None and decode_s is not None and wait_s + decode_s > time_remaining_s:
            q = self._pools[pools[-1]]
            raise RouterError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"overloaded: at the measured pace (first token in {wait_s:.2f} s, then {q.tpot_s * 1e3:.0f} ms per "
                f"token with a {FINISH_MARGIN:g}x margin "
                f"for ~{min(max_tokens or q.output_len, q.output_len):.0f} tokens) the request would end in "
                f"{wait_s + decode_s:.2f} s, after its deadline ({time_remaining_s:.2f} s); retry later",
                retry_after_s=wait_s + decode_s - time_remaining_s)
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

    def record_finished(self, pool: str, num_output_tokens: int, tpot_s: float) -> None:
        """A request finished decoding on `pool`: its output length and seconds per output token after the first
        (the finish-time estimate's measurements)."""
        q = self._pools[pool]
        a = EWMA_ALPHA
        q.tpot_s = tpot_s if q.tpot_s is None else (1 - a) * q.tpot_s + a * tpot_s
        q.output_len = num_output_tokens if q.output_len is None else (1 - a) * q.output_len + a * num_output_tokens
        q.num_finished += 1
