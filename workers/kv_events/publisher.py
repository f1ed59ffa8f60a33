"""A worker's KV events, published to a Redis Stream with a periodic snapshot, off the engine thread.

The engine thread hands each step's events to `KVEventPublisher.publish()`: under a lock it numbers them as one
batch (`seq` 1, 2, 3, ... per `epoch`, a new uuid per engine start), applies them to a mirror of the worker's
cached block hashes and queues the batch. An asyncio task on the worker's event loop writes queued batches to
the stream (XADD, `MAXLEN ~ 100000`) and, every `interval_s`, the mirror as the worker's snapshot (SET with
`PX` = 2 x interval_s: a dead worker's snapshot vanishes). The snapshot's `stream_id` is the entry of the last
batch written, or before the first one, the stream's last entry when the worker first wrote its snapshot: a
router reads on from there ("0-0" only when the stream was empty). The wire format is in docs/architecture.md
("KV events").

Redis never holds the engine back: publish() is a lock, a set update and a deque append. While Redis is down or
slow the batches wait in a bounded queue; when it overflows the oldest batches are dropped, so their `seq` is
missing from the stream: routers see the gap and resync this worker from its next snapshot, which the mirror
keeps exact whatever was dropped. On a clean stop the snapshot is deleted.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

from tandem.aio import cancel_and_wait, timeout
from tandem.redis_store import RedisStore, RedisUnavailable, StoreConfig
from workers.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent, replay

log = logging.getLogger(__name__)

# The engine's block hash (workers/kv/block_pool.py: blake2b, 8 bytes, chained from ROOT_HASH, the model name as
# extra). Routers refuse batches of another version; router/cache/prefix_index.py holds the same string.
HASH_VERSION = "blake2b64-v1"
STREAM_MAXLEN = 100_000


@dataclass(frozen=True)
class KVEventsConfig:
    """interval_s: how often the snapshot is written (its TTL is twice that), seconds.
    max_pending_batches: batches kept while Redis is unreachable; past it the oldest are dropped (a gap).
    max_batches_per_call: batches written per round trip (one pipeline).
    socket_timeout_s: the most one Redis call waits; nothing on a request path waits on it.
    """

    interval_s: float = 2.0
    max_pending_batches: int = 4096
    max_batches_per_call: int = 256
    socket_timeout_s: float = 0.5

    def __post_init__(self):
        for name in ("interval_s", "socket_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("max_pending_batches", "max_batches_per_call"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(slots=True)
class _Batch:
    seq: int
    ts: float
    events: list[KVCacheEvent]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def event_to_wire(event: KVCacheEvent) -> dict:
    if isinstance(event, BlockStored):
        return {"type": "stored", "block_hashes": event.block_hashes}
    if isinstance(event, BlockRemoved):
        return {"type": "removed", "block_hashes": event.block_hashes}
    assert isinstance(event, AllBlocksCleared), event
    return {"type": "cleared"}


class KVEventPublisher:
    """`publish(events)` from the engine thread; `await start()` / `await close()` on the worker's event loop."""

    def __init__(self, redis_url: str, model: str, worker_id: str, block_size: int,
                 config: KVEventsConfig = KVEventsConfig()):
        self.config = config
        self.model = model
        self.worker_id = worker_id
        self.block_size = block_size
        self.epoch = uuid.uuid4().hex
        self.store_config = StoreConfig(redis_url, socket_timeout_s=config.socket_timeout_s)
        self._lock = threading.Lock()
        self._mirror: set[int] = set()  # what the engine caches, as of batch `_seq`
        self._seq = 0
        self._pending: deque[_Batch] = deque()
        self._last_stream_id = "0-0"  # of the last batch written
        self._store: RedisStore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.num_published_batches = 0
        self.num_published_events = 0
        self.num_dropped_batches = 0
        self.num_redis_errors = 0
        self.num_snapshots = 0

    @property
    def stream_key(self) -> str:
        return self.store_config.key_prefix + f"kv_events:{self.model}"

    @property
    def snapshot_key(self) -> str:
        return self.store_config.key_prefix + f"kv_snapshot:{self.model}:{self.worker_id}"

    @property
    def stats(self) -> dict[str, int]:
        return dict(published_batches=self.num_published_batches, published_events=self.num_published_events,
                    dropped_batches=self.num_dropped_batches, redis_errors=self.num_redis_errors,
                    pending_batches=len(self._pending))

    # --- engine thread ----------------------------------------------------------------------------------------

    def publish(self, events: list[KVCacheEvent]) -> None:
        """One batch of events, in order. Never blocks on Redis, never raises."""
        if not events:
            return
        with self._lock:
            replay(events, self._mirror)
            self._seq += 1
            self._pending.append(_Batch(self._seq, time.time(), events))
            if len(self._pending) > self.config.max_pending_batches:
                self._pending.popleft()
                self.num_dropped_batches += 1
            wake = len(self._pending) == 1
        if wake and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop is closed: the worker is stopping
                pass

    # --- event loop -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._store = RedisStore(self.store_config)
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self.worker_id}")
        log.info("worker %s: publishing KV events to %s on %s (epoch %s)", self.worker_id, self.stream_key,
                 self.store_config.redacted_url, self.epoch)

    async def close(self) -> None:
        """Write what is queued (one try) and delete the snapshot: routers drop this worker at once."""
        if self._task is None:
            return
        await cancel_and_wait(self._task)
        self._task = None
        try:
            await self._flush()
            await self._store.call(lambda r: r.delete(self.snapshot_key))
        except RedisUnavailable:
            pass
        await self._store.close()

    async def _run(self) -> None:
        interval = self.config.interval_s
        next_snapshot = 0.0
        while True:
            ok = True
            try:
                # Snapshot first: at start, routers learn of this worker before its first batches arrive.
                if time.monotonic() >= next_snapshot:
                    await self._write_snapshot()
                    next_snapshot = time.monotonic() + interval
                await self._flush()
            except RedisUnavailable as e:
                self.num_redis_errors += 1
                log.debug("worker %s: KV events not published: %s", self.worker_id, e)
                ok = False
            except Exception:  # noqa: BLE001 - a bug here must not end publishing for good
                log.exception("worker %s: publishing KV events failed", self.worker_id)
                ok = False
            # Failed: retry soon, without spinning (the breaker answers at once while open).
            wait_s = max(next_snapshot - time.monotonic(), 0.0) if ok else min(0.2, interval)
            self._wake.clear()
            if ok and self._pending:
                continue
            try:
                async with timeout(wait_s):
                    await self._wake.wait()
            except asyncio.TimeoutError:
                pass

    def _take(self) -> list[_Batch]:
        with self._lock:
            n = min(len(self._pending), self.config.max_batches_per_call)
            return [self._pending.popleft() for _ in range(n)]

    def _put_back(self, batches: list[_Batch]) -> None:
        """Unsent batches go back in front of newer ones; past the bound the oldest are dropped."""
        with self._lock:
            self._pending.extendleft(reversed(batches))
            while len(self._pending) > self.config.max_pending_batches:
                self._pending.popleft()
                self.num_dropped_batches += 1

    async def _flush(self) -> None:
        while True:
            batches = self._take()
            if not batches:
                return
            entries = [json.dumps(self._wire(b), separators=(",", ":")) for b in batches]

            async def xadd_all(r):
                async with r.pipeline(transaction=False) as pipe:
                    for data in entries:
                        pipe.xadd(self.stream_key, {"data": data}, maxlen=STREAM_MAXLEN, approximate=True)
                    return await pipe.execute()

            try:
                ids = await self._store.call(xadd_all, timeout_s=2 * self.config.socket_timeout_s)
            except BaseException:
                # Written or not, they are sent again: a batch seen twice is "old" to routers, never applied twice.
                self._put_back(batches)
                raise
            self._last_stream_id = _text(ids[-1])
            self.num_published_batches += len(batches)
            self.num_published_events += sum(len(b.events) for b in batches)

    def _wire(self, batch: _Batch) -> dict:
        return {"worker_id": self.worker_id, "epoch": self.epoch, "seq": batch.seq, "block_size": self.block_size,
                "hash_version": HASH_VERSION, "ts": batch.ts, "events": [event_to_wire(e) for e in batch.events]}

    async def _write_snapshot(self) -> None:
        if self._last_stream_id == "0-0":
            # Nothing written yet: every batch of this worker will lie after the stream's last entry now, so a
            # router reads from there, not from the stream's start.
            top = await self._store.call(lambda r: r.xrevrange(self.stream_key, count=1),
                                         timeout_s=2 * self.config.socket_timeout_s)
            if top and self._last_stream_id == "0-0":
                self._last_stream_id = _text(top[0][0])
        with self._lock:
            seq, block_hashes = self._seq, list(self._mirror)
        # Batches up to `seq` that are still queued come later in the stream, where routers skip them as "old".
        interval = self.config.interval_s
        snapshot = {
            "worker_id": self.worker_id, "epoch": self.epoch, "seq": seq, "stream_id": self._last_stream_id,
            "block_size": self.block_size, "hash_version": HASH_VERSION, "ts": time.time(), "interval_s": interval,
            "block_hashes": block_hashes,
        }
        # Tens of ms for a large cache: off this loop, which also streams the worker's tokens.
        data = await asyncio.to_thread(json.dumps, snapshot, separators=(",", ":"))
        await self._store.call(lambda r: r.set(self.snapshot_key, data, px=int(2 * interval * 1000)),
                               timeout_s=2 * self.config.socket_timeout_s)
        self.num_snapshots += 1
