"""Feeds a router's `PrefixIndex` from the workers' KV events in Redis (wire format: docs/architecture.md, "KV
events"; the publisher: workers/kv_events/publisher.py).

One asyncio task per router, with its own Redis client (a socket timeout longer than its XREAD BLOCK):
- bootstrap: the snapshot of every worker the registry lists (`kv_snapshot:<model>:<worker_id>`; a SCAN would
  find the same ones and walk every other key too), then the stream from the smallest snapshot `stream_id`;
  batches a snapshot covers are "old" and skipped;
- follow: XREAD BLOCK from the last entry read; each batch is checked (a worker the registry lists, its block
  size, the hash version), then applied in order;
- resync every `resync_interval_s`: workers the index does not hold in order (new, restarted, or stale after a
  gap) get their latest snapshot, then the batches held for them since; a worker whose snapshot expired (dead)
  or that the registry stopped listing leaves the index.

Redis down: the index keeps what it had (possibly stale: `redis_up` says so) and the router serves on; when Redis
answers again the follower resyncs from snapshots. Batches refused are counted by reason in `num_rejected` and
logged once per worker and reason, never applied.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from router.cache.prefix_index import HASH_VERSION, PrefixIndex
from tandem.aio import cancel_and_wait
from tandem.redis_store import RedisStore, RedisUnavailable, StoreConfig

log = logging.getLogger(__name__)

# Why a batch (or snapshot) was not applied when it arrived, as counted in `num_rejected` and the router's metrics.
# "gap" (a batch before it was missed) and "unknown_epoch" (no snapshot of that worker's engine start loaded yet):
# the batch is held and replayed after the worker's next snapshot. The others are refused for good.
REJECT_REASONS = ("gap", "unknown_epoch", "unknown_worker", "block_size", "hash_version", "malformed")
HELD_REASONS = ("gap", "unknown_epoch")


@dataclass(frozen=True)
class FollowerConfig:
    """block_s: how long one XREAD waits for new entries, seconds.
    resync_interval_s: how often snapshots are checked (stale workers reloaded, expired ones dropped), seconds.
    max_held_batches: per worker waiting for a snapshot, the batches kept to replay after it (oldest dropped).
    retry_s: the wait between attempts while Redis is unreachable, seconds.
    read_count: stream entries read per call.
    """

    block_s: float = 0.5
    resync_interval_s: float = 1.0
    max_held_batches: int = 4096
    retry_s: float = 0.5
    read_count: int = 1000

    def __post_init__(self):
        for name in ("block_s", "resync_interval_s", "retry_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("max_held_batches", "read_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(slots=True)
class _Batch:
    """One stream entry, its events folded into their net effect (cleared, then removed, then stored)."""

    epoch: str
    seq: int
    cleared: bool
    removed: set[int]
    stored: set[int]


def _fold(events: list[dict]) -> tuple[bool, set[int], set[int]]:
    """The net effect of events applied in order, as PrefixIndex.apply takes it: the last event on a hash wins."""
    cleared, removed, stored = False, set(), set()
    for e in events:
        kind = e["type"]
        if kind == "cleared":
            cleared, removed, stored = True, set(), set()
        elif kind == "stored":
            hashes = set(map(int, e["block_hashes"]))
            stored |= hashes
            removed -= hashes
        elif kind == "removed":
            hashes = set(map(int, e["block_hashes"]))
            removed |= hashes
            stored -= hashes
        else:
            raise ValueError(f"event type {kind!r}")
    return cleared, removed, stored


def _stream_id_key(stream_id: str) -> tuple[int, int]:
    ms, _, n = stream_id.partition("-")
    return int(ms), int(n or 0)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class KVEventsFollower:
    """`await start()` (bootstraps, then follows in a task), `await stop()`; `index` is the PrefixIndex.

    `listed()` returns the workers the router's registry lists for its model: worker id -> block size. Batches of
    other workers are refused ("unknown_worker"); a worker no longer listed leaves the index.
    """

    def __init__(self, redis_url: str, model: str, listed: Callable[[], Mapping[str, int]],
                 config: FollowerConfig = FollowerConfig(), index: PrefixIndex | None = None):
        self.config = config
        self.model = model
        self.listed = listed
        self.index = index if index is not None else PrefixIndex()
        # XREAD BLOCK holds the socket for block_s: the timeout covers that plus a slow answer.
        self.store = RedisStore(StoreConfig(redis_url, socket_timeout_s=config.block_s + 0.5))
        self.stream_key = self.store.key("kv_events", model)
        self.snapshot_prefix = self.store.key("kv_snapshot", model, "")
        self.redis_up = False
        self.num_batches_applied = 0
        self.num_snapshots_loaded = 0
        self.num_workers_expired = 0
        self.num_redis_errors = 0
        self.num_rejected: Counter[str] = Counter({reason: 0 for reason in REJECT_REASONS})
        self._held: dict[str, deque[_Batch]] = {}  # workers waiting for a snapshot, and their batches since
        self._logged: set[tuple[str, str]] = set()
        self._last_id: str | None = None  # the last stream entry read; None: bootstrap first
        self._up_since = 0.0
        self._snapshot_interval_s = 2.0  # the longest interval_s a snapshot announced
        self._next_resync = 0.0
        self._task: asyncio.Task | None = None
        self.bootstrapped = asyncio.Event()

    # --- lifecycle --------------------------------------------------------------------------------------------

    async def start(self, wait_s: float = 2.0) -> None:
        """Start following; waits up to `wait_s` for the bootstrap (never fails: Redis may be down)."""
        self._task = asyncio.create_task(self._run(), name="router-kv-events")
        try:
            await asyncio.wait_for(self.bootstrapped.wait(), wait_s)
        except asyncio.TimeoutError:
            log.warning("prefix index: no bootstrap from %s within %.1f s; routing without it until Redis answers",
                        self.store.config.redacted_url, wait_s)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self.store.close()

    @property
    def num_stale_workers(self) -> int:
        return sum(w.stale for w in self.index.workers.values())

    # --- the loop ---------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                if self._last_id is None:
                    await self._bootstrap()
                elif not self.redis_up:
                    await self._reconnect()
                await self._read()
                if time.monotonic() >= self._next_resync:
                    await self._resync()
            except RedisUnavailable as e:
                self.num_redis_errors += 1
                # One slow call is not an outage: down once the breaker opens (consecutive failures).
                if self.redis_up and not self.store.available:
                    log.warning("prefix index: redis unreachable (%s); keeping the last index", e)
                    self.redis_up = False
                await asyncio.sleep(self.config.retry_s)
            except Exception:  # noqa: BLE001 - a bug must not stop the index for good
                log.exception("prefix index: following KV events failed")
                await asyncio.sleep(self.config.retry_s)

    def _mark_up(self) -> None:
        if not self.redis_up:
            self._up_since = time.monotonic()
            self.redis_up = True

    async def _top_id(self) -> str:
        entries = await self.store.call(lambda r: r.xrevrange(self.stream_key, count=1))
        return _text(entries[0][0]) if entries else "0-0"

    async def _bootstrap(self) -> None:
        top = await self._top_id()
        self._mark_up()
        loaded = await self._resync(snapshot_all=True)
        # Entries after the oldest snapshot hold what the snapshots do not.
        self._last_id = min(loaded, key=_stream_id_key) if loaded else top
        self.bootstrapped.set()
        log.info("prefix index: bootstrapped %d workers (%d blocks) from snapshots; reading %s from %s",
                 len(self.index.workers), self.index.num_blocks(), self.stream_key, self._last_id)

    async def _reconnect(self) -> None:
        """Redis answers again: the index was kept; continue from the last entry read, unless the stream is not
        the one read before (Redis restarted empty), then resync from snapshots."""
        top = await self._top_id()
        if _stream_id_key(top) < _stream_id_key(self._last_id):
            self._last_id = "0-0"
        self._mark_up()
        log.info("prefix index: redis reachable again; resyncing")
        self._next_resync = 0.0

    async def _read(self) -> None:
        block_ms = int(self.config.block_s * 1000)
        resp = await self.store.call(
            lambda r: r.xread({self.stream_key: self._last_id}, count=self.config.read_count, block=block_ms),
            timeout_s=self.config.block_s + 1.0)
        self._mark_up()
        listed = self.listed()
        self._drop_unlisted(listed)
        for _stream, entries in resp or ():
            for entry_id, fields in entries:
                self._last_id = _text(entry_id)
                self._on_entry(fields, listed)

    # --- batches ----------------------------------------------------------------------------------------------

    def _reject(self, reason: str, worker_id: str, detail: str = "") -> None:
        self.num_rejected[reason] += 1
        if (worker_id, reason) in self._logged:
            return
        self._logged.add((worker_id, reason))
        if reason in HELD_REASONS:
            log.info("prefix index: worker %s: %s; its batches wait for its next snapshot", worker_id, reason)
        else:
            log.warning("prefix index: ignoring KV events of worker %s: %s%s", worker_id, reason,
                        f" ({detail})" if detail else "")

    def _check(self, data: dict, listed: Mapping[str, int]) -> str | None:
        """The reason a batch or snapshot of a worker is refused, or None."""
        worker_id = data["worker_id"]
        if worker_id not in listed:
            return "unknown_worker"
        if data.get("hash_version") != HASH_VERSION:
            return "hash_version"
        if data.get("block_size") != listed[worker_id]:
            return "block_size"
        return None

    def _on_entry(self, fields: Mapping, listed: Mapping[str, int]) -> None:
        try:
            data = json.loads(fields[b"data"] if b"data" in fields else fields["data"])
            worker_id = str(data["worker_id"])
            reason = self._check(data, listed)
            if reason is None:
                batch = _Batch(str(data["epoch"]), int(data["seq"]), *_fold(data["events"]))
        except (KeyError, TypeError, ValueError) as e:
            self._reject("malformed", "?", f"{type(e).__name__}: {e}")
            return
        if reason is not None:
            detail = {"hash_version": f"{data.get('hash_version')!r}, expected {HASH_VERSION!r}",
                      "block_size": f"{data.get('block_size')}, registered {listed.get(worker_id)}"}.get(reason, "")
            self._reject(reason, worker_id, detail)
            return
        self._apply(worker_id, batch)

    def _apply(self, worker_id: str, batch: _Batch) -> None:
        held = self._held.get(worker_id)
        if held is not None:
            if held and held[-1].epoch != batch.epoch:
                held.clear()  # the worker restarted: only its new engine's batches count
            held.append(batch)
            return
        result = self.index.apply(worker_id, batch.epoch, batch.seq, stored=batch.stored, removed=batch.removed,
                                  cleared=batch.cleared)
        if result == "applied":
            self.num_batches_applied += 1
        elif result != "old":
            # A missed batch, or a worker (or engine start) with no snapshot loaded: hold from here until one is.
            self._reject("gap" if result == "gap" else "unknown_epoch", worker_id)
            self._held[worker_id] = deque([batch], maxlen=self.config.max_held_batches)
            known = self.index.workers.get(worker_id)
            if known is not None:  # a restarted engine: what its old one cached is not scored any more
                known.stale = True

    # --- snapshots --------------------------------------------------------------------------------------------

    async def _resync(self, snapshot_all: bool = False) -> list[str]:
        """Load the snapshots of workers not held in order (all of them with `snapshot_all`); drop the workers
        whose snapshot is gone. Returns the stream ids of the snapshots loaded."""
        self._next_resync = time.monotonic() + self.config.resync_interval_s
        listed = self.listed()
        self._drop_unlisted(listed)
        # Only the listed workers' keys (batches of others are refused anyway): O(workers), where a SCAN would
        # walk every key in Redis (KV tier blocks, semantic cache entries) each time.
        worker_ids = list(listed)
        keys = [self.snapshot_prefix + wid for wid in worker_ids]

        async def exists(r):
            async with r.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(key)
                return await pipe.execute()

        found = await self.store.call(exists, timeout_s=2.0) if keys else []
        present = {wid for wid, n in zip(worker_ids, found) if n}
        self._drop_expired(present)
        wanted = [wid for wid in worker_ids if wid in present and (
            snapshot_all or wid in self._held or wid not in self.index.workers or self.index.workers[wid].stale)]
        if not wanted:
            return []
        values = await self.store.call(lambda r: r.mget([self.snapshot_prefix + wid for wid in wanted]),
                                       timeout_s=2.0)
        loaded = []
        for wid, value in zip(wanted, values):
            if value is None:
                continue
            try:
                # Large snapshots take tens of ms to parse: off the router's loop.
                snap = await asyncio.to_thread(json.loads, value) if len(value) > 65536 else json.loads(value)
            except ValueError as e:
                self._reject("malformed", wid, f"snapshot: {e}")
                continue
            stream_id = self._load_snapshot(wid, snap, listed)
            if stream_id is not None:
                loaded.append(stream_id)
        return loaded

    def _load_snapshot(self, worker_id: str, snap: dict, listed: Mapping[str, int]) -> str | None:
        try:
            reason = self._check(snap, listed)
            epoch, seq = str(snap["epoch"]), int(snap["seq"])
            block_hashes = [int(h) for h in snap["block_hashes"]]
            stream_id = _text(snap["stream_id"])
            _stream_id_key(stream_id)
            interval_s = float(snap.get("interval_s", self._snapshot_interval_s))
        except (KeyError, TypeError, ValueError) as e:
            self._reject("malformed", worker_id, f"snapshot: {type(e).__name__}: {e}")
            return None
        if reason is not None:
            self._reject(reason, worker_id, "snapshot")
            return None
        self._snapshot_interval_s = max(self._snapshot_interval_s, interval_s)
        held = self._held.get(worker_id)
        if held:
            if held[-1].epoch != epoch or held[0].seq > seq + 1:
                return None  # older than what was missed: the next snapshot will cover it
        known = self.index.workers.get(worker_id)
        if known is not None and known.epoch == epoch and not known.stale and known.seq >= seq and not held:
            return stream_id  # already in order and at least as new
        self.index.load_snapshot(worker_id, epoch, seq, listed[worker_id], block_hashes)
        self.num_snapshots_loaded += 1
        for batch in self._held.pop(worker_id, ()):
            self._apply(worker_id, batch)
        return stream_id

    def _drop_unlisted(self, listed: Mapping[str, int]) -> None:
        for worker_id in [w for w in self.index.workers if w not in listed]:
            self.index.remove_worker(worker_id)
            log.info("prefix index: worker %s left the registry; its blocks leave the index", worker_id)
        for worker_id in [w for w in self._held if w not in listed]:
            del self._held[worker_id]

    def _drop_expired(self, present: set[str]) -> None:
        """A worker without a snapshot in Redis is dead (its snapshot expired) or stopped (it deleted it). After
        Redis comes back empty, workers get one resync interval plus their snapshot interval to write theirs."""
        if time.monotonic() - self._up_since < 2 * self.config.resync_interval_s + self._snapshot_interval_s:
            return
        for worker_id in [w for w in self.index.workers if w not in present]:
            self.index.remove_worker(worker_id)
            self._held.pop(worker_id, None)
            self.num_workers_expired += 1
            log.info("prefix index: worker %s has no snapshot any more; its blocks leave the index", worker_id)
