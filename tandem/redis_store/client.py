"""Fail-fast access to Redis: no request ever waits on it for long, and a dead Redis is skipped, not retried.

redis-py's defaults retry a failed call (3 times with backoff) and wait on a dead socket for seconds; here every
call has `socket_timeout_s` (100 ms by default) and no retries, and a `CircuitBreaker` stops calling after
`failure_threshold` consecutive failures. While it is open, calls raise `RedisUnavailable` at once; after
`reset_timeout_s` one call goes through as a probe (half-open), and its success closes the breaker again. The
pattern is the classic one (Nygard, *Release It!*, "Circuit Breaker"); the defaults keep the time to notice a
returning Redis well under 5 s.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from tandem.aio import timeout

log = logging.getLogger(__name__)

T = TypeVar("T")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATES = (CLOSED, OPEN, HALF_OPEN)


class RedisUnavailable(Exception):
    """Redis did not answer in time, failed, or the breaker is open: go on without the cache."""


@dataclass(frozen=True)
class StoreConfig:
    """Where Redis is and how long to wait for it.

    url: `redis://[:password@]host:port/db` or `rediss://...` (TLS); user and password may be in the URL.
    socket_timeout_s: the most one call waits (connect included), seconds.
    failure_threshold: consecutive failures that open the breaker.
    reset_timeout_s: how long the breaker stays open before one probe call, seconds.
    key_prefix: every key and stream the cluster writes starts with it (several clusters can share a server).
    """

    url: str
    socket_timeout_s: float = 0.1
    failure_threshold: int = 3
    reset_timeout_s: float = 1.0
    key_prefix: str = "tandem:"

    def __post_init__(self):
        parts = urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"redis_url: must start with redis://, rediss:// or unix://, got {self.url!r}")
        if parts.scheme != "unix":
            try:
                port = parts.port  # ValueError for a port that is not a number in 0-65535
            except ValueError:
                port = -1
            if not parts.hostname or port == -1 or port == 0:
                raise ValueError(f"redis_url: must be {parts.scheme}://[[user]:password@]host[:port][/db] with a port "
                                 f"in 1-65535, got {self.redacted_url if port != -1 else parts.scheme + '://...'}")
        for name in ("socket_timeout_s", "reset_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold: must be >= 1, got {self.failure_threshold}")

    @property
    def redacted_url(self) -> str:
        """The URL without its password, for logs."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
        return parts._replace(netloc=netloc).geturl()


class CircuitBreaker:
    """closed → (failure_threshold consecutive failures) → open → (reset_timeout_s) → half_open → one probe:
    success → closed, failure → open again. `on_change(state)` is called on every transition."""

    def __init__(self, failure_threshold: int = 3, reset_timeout_s: float = 1.0,
                 on_change: Callable[[str], None] = lambda state: None, clock: Callable[[], float] = time.monotonic):
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self.on_change = on_change
        self._clock = clock
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.num_opened = 0

    @property
    def state(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self.reset_timeout_s:
            return HALF_OPEN
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to Redis now; in half-open, only one call at a time (the probe)."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def release_probe(self) -> None:
        """A call let through ended with neither success nor failure (cancelled): another may probe."""
        self._probing = False

    def record_success(self) -> None:
        self._failures = 0
        self._probing = False
        if self._state != CLOSED:
            self._set(CLOSED)
            log.info("redis is back: cache on again")

    def record_failure(self, reason: str = "") -> None:
        """reason: what failed (logged when the breaker opens: a wrong password reads differently from a timeout)."""
        self._failures += 1
        was_probe, self._probing = self._probing, False
        if self._state == OPEN and was_probe:
            self._opened_at = self._clock()  # the probe failed: wait another reset_timeout_s
        elif self._state == CLOSED and self._failures >= self.failure_threshold:
            self._opened_at = self._clock()
            self.num_opened += 1
            self._set(OPEN)
            log.warning("redis failed %d calls in a row%s: serving without the cache", self._failures,
                        f" (last: {reason})" if reason else "")

    def _set(self, state: str) -> None:
        self._state = state
        self.on_change(state)


class RedisStore:
    """An asyncio Redis client behind a circuit breaker. `await store.call(lambda r: r.get(key))` returns the
    result or raises `RedisUnavailable` within about `socket_timeout_s`; nothing else escapes.

    One store per process and event loop. `client` is the raw `redis.asyncio.Redis` (decode_responses=False:
    values are bytes) for callers that handle RedisError themselves.
    """

    def __init__(self, config: StoreConfig, on_state_change: Callable[[str], None] = lambda state: None,
                 on_call: Callable[[float, bool], None] = lambda duration_s, ok: None):
        """`on_state_change(state)` on every breaker transition; `on_call(duration_s, ok)` after every call that
        reached Redis (for a latency histogram: the most a request waited on Redis)."""
        self.config = config
        self.on_call = on_call
        self.breaker = CircuitBreaker(config.failure_threshold, config.reset_timeout_s, on_state_change)
        self.client = aioredis.Redis.from_url(
            config.url,
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
            max_connections=64,
        )
        self.num_calls = 0
        self.num_failures = 0

    def key(self, *parts: object) -> str:
        """`key_prefix` + parts joined by ':' (e.g. key("kv_events", model) -> "tandem:kv_events:<model>")."""
        return self.config.key_prefix + ":".join(str(p) for p in parts)

    @property
    def available(self) -> bool:
        """The breaker lets calls through (closed, or half-open waiting for its probe)."""
        return self.breaker.state != OPEN

    async def call(self, fn: Callable[[aioredis.Redis], Awaitable[T]], timeout_s: float | None = None) -> T:
        """Run `fn(client)`; RedisUnavailable when the breaker is open, on any Redis or socket error, or after
        `timeout_s` (default: `socket_timeout_s` plus 50 ms, a bound on the whole call)."""
        if not self.breaker.allow():
            raise RedisUnavailable(f"redis at {self.config.redacted_url}: circuit open")
        self.num_calls += 1
        start = time.monotonic()
        try:
            async with timeout(timeout_s or self.config.socket_timeout_s + 0.05):
                result = await fn(self.client)
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self.num_failures += 1
            why = f"redis at {self.config.redacted_url}: {type(e).__name__}: {e}"
            self.breaker.record_failure(why)
            self.on_call(time.monotonic() - start, False)
            raise RedisUnavailable(why) from None
        except BaseException:
            self.breaker.release_probe()
            raise
        self.breaker.record_success()
        self.on_call(time.monotonic() - start, True)
        return result

    async def ping(self) -> bool:
        try:
            return bool(await self.call(lambda r: r.ping()))
        except RedisUnavailable:
            return False

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:  # closing a client whose server is gone
            pass
