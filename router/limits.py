"""Per-tenant rate limits: token buckets on requests per second and tokens per minute.

A request takes 1 from its tenant's requests bucket (capacity: one second's worth, at least 1) and reserves
prompt tokens + max_tokens from its tokens bucket (capacity: one minute's worth) when it is admitted; when it ends,
the part of max_tokens it did not generate is put back. A bucket that cannot pay refuses the request with
RESOURCE_EXHAUSTED (HTTP 429) and the seconds after which it could (gRPC trailing metadata `retry-after`, HTTP
`Retry-After`). A request that reserves more tokens than a whole minute's worth can never pass: it is refused
without retry_after, naming max_tokens.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from router.errors import RouterError
from router.tenants import Tenant


class TokenBucket:
    """`rate_per_s` refill up to `capacity`; starts full."""

    def __init__(self, rate_per_s: float, capacity: float, now: float):
        self.rate_per_s = rate_per_s
        self.capacity = capacity
        self.level = capacity
        self.updated_at = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated_at) * self.rate_per_s)
        self.updated_at = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0: now)."""
        self._refill(now)
        return max(0.0, (amount - self.level) / self.rate_per_s)

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def put(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)


class Reservation:
    """What one admitted request holds; `settle(num_generated)` refunds the unused part of its max_tokens."""

    def __init__(self, bucket: TokenBucket | None, reserved: int, prompt_len: int, clock: Callable[[], float]):
        self._bucket, self._reserved, self._prompt_len, self._clock = bucket, reserved, prompt_len, clock

    def settle(self, num_generated: int) -> None:
        if self._bucket is not None:
            self._bucket.put(max(0, self._reserved - self._prompt_len - num_generated), self._clock())
            self._bucket = None


class TenantLimits:
    """The buckets of every tenant that has limits, created on its first request."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def acquire(self, tenant: Tenant, prompt_len: int, max_tokens: int) -> Reservation:
        """Take one request and prompt_len + max_tokens tokens from `tenant`'s buckets, or raise
        RESOURCE_EXHAUSTED with retry_after_s; both buckets are charged or neither."""
        now = self._clock()
        requests = tokens = None
        if tenant.requests_per_second is not None:
            requests = self._requests.get(tenant.name)
            if requests is None:
                rate = tenant.requests_per_second
                requests = self._requests[tenant.name] = TokenBucket(rate, max(1.0, rate), now)
        num_tokens = prompt_len + max_tokens
        if tenant.tokens_per_minute is not None:
            tokens = self._tokens.get(tenant.name)
            if tokens is None:
                per_min = tenant.tokens_per_minute
                tokens = self._tokens[tenant.name] = TokenBucket(per_min / 60.0, per_min, now)
            if num_tokens > tokens.capacity:
                raise RouterError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"max_tokens: the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceed tenant "
                    f"{tenant.name!r}'s tokens_per_minute={tenant.tokens_per_minute}; lower max_tokens")
        waits = []
        if requests is not None:
            waits.append((requests.wait_s(1, now), f"requests_per_second={tenant.requests_per_second:g}"))
        if tokens is not None:
            waits.append((tokens.wait_s(num_tokens, now), f"tokens_per_minute={tenant.tokens_per_minute}"))
        wait_s, limit = max(waits, default=(0.0, ""))
        if wait_s > 0:
            raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"tenant {tenant.name!r} is over its {limit}; retry after {wait_s:.2f} s",
                              retry_after_s=wait_s)
        if requests is not None:
            requests.take(1, now)
        if tokens is not None:
            tokens.take(num_tokens, now)
        return Reservation(tokens, num_tokens, prompt_len, self._clock)
