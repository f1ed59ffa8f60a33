"""The KV events wire between a worker's publisher and a router's prefix index, against a real valkey-server: live
following, a router started late (snapshot + stream tail), refused batches, a dead worker's snapshot expiring,
and Redis killed and restarted (the publisher drops batches, the follower sees the gap and resyncs)."""
from __future__ import annotations

import asyncio
import json
import time

import redis

from router.cache.kv_events_follower import FollowerConfig, KVEventsFollower
from router.cache.prefix_index import HASH_VERSION
from tandem.redis_store import EmbeddedRedis
from workers.kv.block_pool import hash_token_blocks
from workers.kv.events import BlockRemoved, BlockStored
from workers.kv_events import HASH_VERSION as WORKER_HASH_VERSION
from workers.kv_events import KVEventPublisher, KVEventsConfig

MODEL = "tiny-model"
FAST = FollowerConfig(block_s=0.05, resync_interval_s=0.1, retry_s=0.05)


def chain(n_blocks: int, start: int) -> list[int]:
    return hash_token_blocks(list(range(start, start + 16 * n_blocks)), 16, MODEL.encode())


async def until(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def publisher(url: str, worker_id: str = "w1", **config) -> KVEventPublisher:
    return KVEventPublisher(url, MODEL, worker_id, 16, KVEventsConfig(**{"interval_s": 0.2, **config}))


def synced(follower: KVEventsFollower, pub: KVEventPublisher) -> bool:
    w = follower.index.workers.get(pub.worker_id)
    return w is not None and not w.stale and w.block_hashes == pub._mirror


def test_hash_versions_agree():
    assert WORKER_HASH_VERSION == HASH_VERSION


def test_a_follower_tracks_a_worker_live_and_a_late_one_rebuilds_from_snapshot_and_tail(redis_url):
    async def scenario():
        # A long snapshot interval: the late follower needs the stream's tail, not only the snapshot.
        pub = publisher(redis_url, interval_s=30.0)
        await pub.start()
        listed = {"w1": 16}
        live = KVEventsFollower(redis_url, MODEL, lambda: listed, FAST)
        await live.start()
        await until(lambda: "w1" in live.index.workers, what="the worker's first snapshot loaded")
        a, b = chain(4, 0), chain(3, 5000)
        pub.publish([BlockStored(a[:2])])
        pub.publish([BlockStored(a[2:]), BlockStored(b)])
        pub.publish([BlockRemoved(a[3:]), BlockStored(b[:1])])  # the last event on a hash wins
        await until(lambda: synced(live, pub), what="the live follower in sync")
        assert live.index.match(a) == {"w1": 3} and live.index.match(b) == {"w1": 3}
        assert live.num_batches_applied == 3

        late = KVEventsFollower(redis_url, MODEL, lambda: listed, FAST)
        await late.start()
        await until(lambda: synced(late, pub), what="the late follower in sync")
        assert late.num_snapshots_loaded == 1 and late.num_batches_applied == 3, "snapshot, then the tail"
        assert late.index.match(a) == live.index.match(a)
        for f in (live, late):
            assert sum(f.num_rejected.values()) == 0
            await f.stop()
        await pub.close()

    asyncio.run(scenario())


def test_refused_batches_are_counted_by_reason_and_never_applied(redis_url):
    async def scenario():
        listed = {"w1": 16, "w2": 32}
        follower = KVEventsFollower(redis_url, MODEL, lambda: listed, FAST)
        await follower.start()
        good, wrong_size, stranger = publisher(redis_url, "w1"), publisher(redis_url, "w2"), publisher(redis_url, "w9")
        for p in (good, wrong_size, stranger):
            await p.start()
            p.publish([BlockStored(chain(2, 0))])
        client = redis.Redis.from_url(redis_url)
        batch = {"worker_id": "w1", "epoch": good.epoch, "seq": 99, "block_size": 16, "hash_version": "md5-v0",
                 "ts": time.time(), "events": [{"type": "stored", "block_hashes": [1]}]}
        client.xadd(f"tandem:kv_events:{MODEL}", {"data": json.dumps(batch)})
        client.xadd(f"tandem:kv_events:{MODEL}", {"data": b"not json"})
        client.close()
        await until(lambda: synced(follower, good), what="the good worker indexed")
        await until(lambda: follower.num_rejected["malformed"] == 1, what="the malformed batch counted")
        rejected = follower.num_rejected
        assert rejected["block_size"] >= 1 and rejected["unknown_worker"] >= 1 and rejected["hash_version"] == 1
        assert set(follower.index.workers) == {"w1"} and follower.index.num_blocks() == 2
        for p in (good, wrong_size, stranger):
            await p.close()
        await follower.stop()

    asyncio.run(scenario())


def test_a_dead_workers_blocks_leave_when_its_snapshot_expires_and_a_stopped_one_at_once(redis_url):
    async def scenario():
        listed = {"dead": 16, "stopped": 16}
        follower = KVEventsFollower(redis_url, MODEL, lambda: listed, FAST)
        dead, stopped = publisher(redis_url, "dead"), publisher(redis_url, "stopped")
        for p in (dead, stopped):
            await p.start()
            p.publish([BlockStored(chain(3, 0))])
        await follower.start()
        await until(lambda: synced(follower, dead) and synced(follower, stopped), what="both indexed")
        # Still listed by the registry (it has not noticed yet); only its snapshot's TTL (2 x 0.2 s) tells.
        dead._task.cancel()  # the process is gone: no more snapshots, nothing deleted
        await until(lambda: "dead" not in follower.index.workers, what="the dead worker dropped")
        assert follower.num_workers_expired == 1 and "stopped" in follower.index.workers
        await stopped.close()  # a clean stop deletes its snapshot
        await until(lambda: "stopped" not in follower.index.workers, timeout_s=2, what="the stopped worker dropped")
        assert follower.index.num_blocks() == 0
        await dead._store.close()
        await follower.stop()

    asyncio.run(scenario())


def test_workers_the_registry_drops_leave_the_index(redis_url):
    async def scenario():
        listed = {"w1": 16}
        follower = KVEventsFollower(redis_url, MODEL, lambda: listed, FAST)
        pub = publisher(redis_url, "w1")
        await pub.start()
        pub.publish([BlockStored(chain(2, 0))])
        await follower.start()
        await until(lambda: synced(follower, pub), what="indexed")
        listed.clear()
        await until(lambda: not follower.index.workers, what="dropped with the registry listing")
        await pub.close()
        await follower.stop()

    asyncio.run(scenario())


def test_redis_killed_and_restarted_publisher_drops_and_follower_resyncs():
    async def scenario():
        server = EmbeddedRedis()
        url = server.start()
        port = server.port
        listed = {"w1": 16}
        pub = publisher(url, max_pending_batches=3)
        follower = KVEventsFollower(url, MODEL, lambda: listed, FAST)
        try:
            await pub.start()
            await follower.start()
            a = chain(6, 0)
            pub.publish([BlockStored(a[:2])])
            await until(lambda: synced(follower, pub), what="in sync before the outage")
            server.stop()
            start = time.monotonic()
            for i in range(2, 6):  # four batches while Redis is gone: one more than the publisher keeps
                pub.publish([BlockStored(a[i:i + 1])])
            assert time.monotonic() - start < 0.1, "publishing never waits on Redis"
            await until(lambda: not follower.redis_up and pub.num_redis_errors > 0, what="the outage noticed")
            assert pub.num_dropped_batches == 1
            assert follower.index.match(a) == {"w1": 2}, "the last index is kept while Redis is down"
            server = EmbeddedRedis(port=port)
            server.start()
            await until(lambda: follower.redis_up, what="the follower back")
            await until(lambda: synced(follower, pub), what="resynced after the gap")
            assert follower.num_rejected["gap"] >= 1, "the dropped batch was seen as a gap"
            assert follower.index.match(a) == {"w1": 6}
        finally:
            await pub.close()
            await follower.stop()
            server.stop()

    asyncio.run(scenario())


def test_a_restarted_engine_replaces_what_its_old_one_cached(redis_url):
    async def scenario():
        listed = {"w1": 16}
        follower = KVEventsFollower(redis_url, MODEL, lambda: listed, FAST)
        old = publisher(redis_url)
        await old.start()
        old.publish([BlockStored(chain(3, 0))])
        await follower.start()
        await until(lambda: synced(follower, old), what="the first engine indexed")
        old._task.cancel()  # died without a clean stop; the same worker id comes back with a new engine
        await old._store.close()
        new = publisher(redis_url)
        await new.start()
        fresh = chain(2, 9000)
        new.publish([BlockStored(fresh)])
        await until(lambda: synced(follower, new), what="the new engine indexed")
        assert follower.index.workers["w1"].epoch == new.epoch != old.epoch
        assert follower.index.match(chain(3, 0)) == {} and follower.index.match(fresh) == {"w1": 2}
        await new.close()
        await follower.stop()

    asyncio.run(scenario())
