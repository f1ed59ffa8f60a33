"""The embedded Redis server and the fail-fast store: real server, real sockets."""
from __future__ import annotations

import asyncio
import time

import pytest

from tandem.redis_store import CircuitBreaker, EmbeddedRedis, RedisStore, RedisUnavailable, StoreConfig
from tandem.redis_store.client import CLOSED, HALF_OPEN, OPEN


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_breaker_opens_after_threshold_and_probes_once_when_half_open():
    clock = FakeClock()
    changes = []
    b = CircuitBreaker(failure_threshold=2, reset_timeout_s=1.0, on_change=changes.append, clock=clock)
    assert b.allow()
    b.record_failure()
    assert b.state == CLOSED
    b.record_failure()
    assert b.state == OPEN and not b.allow()
    clock.now = 1.0
    assert b.state == HALF_OPEN
    assert b.allow() and not b.allow()  # one probe at a time
    b.record_failure()
    assert b.state == OPEN
    clock.now = 2.5
    assert b.allow()
    b.record_success()
    assert b.state == CLOSED and b.allow()
    assert changes == [OPEN, CLOSED]


def test_store_config_refuses_a_bad_url_by_name():
    with pytest.raises(ValueError, match="redis_url"):
        StoreConfig("http://localhost:6379")
    with pytest.raises(ValueError, match="socket_timeout_s"):
        StoreConfig("redis://localhost", socket_timeout_s=0)
    assert StoreConfig("redis://:secret@h:1/0").redacted_url == "redis://:***@h:1/0"
    # Refused at start, not a minute later in every worker (found by a new-user trial); the password never shown.
    for url in ("redis://127.0.0.1:notaport", "redis://:secret@127.0.0.1:99999", "redis://h:0", "redis://:secret@:6379"):
        with pytest.raises(ValueError, match=r"redis_url: must be redis://\[\[user\]:password@\]host") as e:
            StoreConfig(url)
        assert "secret" not in str(e.value)
    assert StoreConfig("rediss://user:pw@redis.example:6380/2").url and StoreConfig("redis://localhost").url


def test_store_against_a_real_server_fails_fast_when_it_dies_and_recovers():
    async def scenario():
        server = EmbeddedRedis()
        url = server.start()
        port = server.port
        store = RedisStore(StoreConfig(url, reset_timeout_s=0.2))
        try:
            assert await store.call(lambda r: r.set(store.key("x"), b"1"))
            assert await store.call(lambda r: r.get(store.key("x"))) == b"1"
            server.stop()
            for _ in range(5):
                start = time.monotonic()
                with pytest.raises(RedisUnavailable):
                    await store.call(lambda r: r.get(store.key("x")))
                assert time.monotonic() - start < 0.5
            assert store.breaker.state in (OPEN, HALF_OPEN) and not await store.ping()
            server2 = EmbeddedRedis(port=port)
            server2.start()
            try:
                deadline = time.monotonic() + 5
                while not await store.ping():
                    assert time.monotonic() < deadline, "the breaker did not close after Redis came back"
                    await asyncio.sleep(0.05)
                assert store.breaker.state == CLOSED
            finally:
                server2.stop()
        finally:
            await store.close()
            server.stop()

    asyncio.run(scenario())


def test_redis_url_fixture_is_a_real_empty_server(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0
    assert client.ping()
    client.close()
