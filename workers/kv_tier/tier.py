"""A remote KV tier in Redis: full blocks a worker evicts are offloaded, and pulled back by any worker of the
same model that misses them locally, when pulling beats recomputing.

- Key: `tandem:kv_block:<model>:<dtype>:tp<rank>of<size>:<block hash, 16 hex>`, one value per block and TP
  rank (workers/kv_tier/codec.py: header with a CRC32, then the raw KV), written with `PX` = ttl_s.
- When: on eviction (write-back). The engine copies an evicted block out before its slots are reused
  (`LLMEngine.set_kv_offload`); this tier pushes it from its own thread. Only what leaves the GPU/CPU cache is
  written, once, rather than every block every prefill computes (write-through).
- Memory: each worker keeps what it wrote within `max_bytes` (oldest keys deleted first) and the TTL ages the rest
  out, so the server needs no maxmemory policy of its own (other data shares it). Evicted KV waiting to be pushed
  is bounded by `max_pending_bytes`; past it blocks are dropped, counted.
- Pull: one pipelined EXISTS finds how many blocks after the locally cached prefix Redis holds; the cost model
  (workers/kv_tier/cost.py) decides; MGETs in batches bounded by a deadline (the recompute estimate, at most
  `pull_timeout_s`); every value's header and CRC are checked. Any error, timeout, missing block or checksum
  mismatch: nothing is inserted and the request recomputes. Redis down never fails a request (RedisStore).

Threads: the tier runs its own asyncio loop thread; `offer` is called on the engine thread, `pull` from any loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from tandem.redis_store import RedisStore, RedisUnavailable, StoreConfig
from workers.kv.block_pool import hash_token_blocks
from workers.kv_tier.codec import BlockFormatError, BlockLayout, ChecksumError, decode_block, encode_block
from workers.kv_tier.cost import CostModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVTierConfig:
    """redis_url: the Redis (or Valkey) holding the tier. ttl_s: how long an offloaded block lives.
    max_bytes: the most this worker keeps there at once (its oldest keys are deleted past it).
    max_pending_bytes: evicted KV waiting to be pushed (past it, evictions are not offloaded).
    pull_timeout_s: the most one pull may take. lookup_timeout_s: the most the lookup before it may take.
    batch_bytes: values per MGET/pipeline, roughly. socket_timeout_s: per socket read or write (RedisStore); each
    call also has its own bound (lookup_timeout_s, the pull's deadline, or loosely for background pushes)."""

    redis_url: str
    ttl_s: float = 600.0
    max_bytes: int = 1 << 30
    max_pending_bytes: int = 256 << 20
    pull_timeout_s: float = 5.0
    lookup_timeout_s: float = 0.1
    batch_bytes: int = 8 << 20
    # Above RedisStore's 100 ms: the reply to a multi-megabyte write can take longer than that on a busy host.
    socket_timeout_s: float = 0.5

    def __post_init__(self):
        StoreConfig(self.redis_url)  # checks the URL
        for name in ("ttl_s", "pull_timeout_s", "lookup_timeout_s", "socket_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"kv_offload_{name}: must be > 0, got {getattr(self, name)}")
        for name in ("max_bytes", "max_pending_bytes", "batch_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"kv_offload_{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class PulledKV:
    """Blocks start_block .. start_block + num_blocks - 1 of token_ids, one tensor per TP rank
    [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]."""

    token_ids: list[int]
    start_block: int
    per_rank_kv: list[torch.Tensor]

    @property
    def num_blocks(self) -> int:
        return self.per_rank_kv[0].shape[2]


def engine_layouts(engine) -> list[BlockLayout]:
    """The block layout of each TP rank of an LLMEngine (read once, at set-up)."""
    c, tp = engine.model_config, engine.executor.tp_size
    return [BlockLayout(engine.dtype, rank, tp, engine.block_size, c.num_hidden_layers,
                        c.num_key_value_heads // tp, c.head_dim) for rank in range(tp)]


class RemoteKVTier:
    """`start()`, `stop()`; `offer(...)` (engine thread: evicted blocks to push), `await pull_async(...)` (any
    event loop: a prompt's blocks after its cached prefix, or None), `insert(engine, pulled)` (engine thread),
    `observe_prefill(...)`, `stats` (counters by name)."""

    def __init__(self, config: KVTierConfig, model: str, layouts: list[BlockLayout], hash_extra: bytes,
                 cost: CostModel | None = None):
        self.config = config
        self.model = model
        self.layouts = layouts
        self.block_size = layouts[0].block_size
        self.hash_extra = hash_extra
        self.cost = cost or CostModel()
        self.block_bytes = sum(layout.value_bytes for layout in layouts)  # one block, all ranks
        dtype = str(layouts[0].dtype).removeprefix("torch.")
        self._store_config = StoreConfig(config.redis_url, socket_timeout_s=config.socket_timeout_s)
        self._key_prefix = self._store_config.key_prefix + ":".join(("kv_block", model, dtype))
        self.store: RedisStore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._queue: asyncio.Queue | None = None
        self._pusher: asyncio.Task | None = None
        self._pending_lock = threading.Lock()
        self._pending_bytes = 0
        # Keys this worker wrote, oldest first: key -> (bytes, expires at, monotonic s).
        self._written: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._written_bytes = 0
        self.on_pull_latency = None  # callable(seconds) for a latency histogram
        # callable(seconds, result) after every lookup, whatever its end: how long a prompt waited on the tier
        self.on_wait = None
        self.last_error = ""  # the last Redis failure, for logs and tests
        self.stats = dict.fromkeys((
            "lookups", "hits", "misses", "skipped", "hit_tokens", "pulled_bytes", "pulled_blocks",
            "pushed_bytes", "pushed_blocks", "push_dropped_blocks", "deleted_blocks", "checksum_failures", "errors",
        ), 0)

    def key(self, tp_rank: int, block_hash: int) -> str:
        return f"{self._key_prefix}:tp{tp_rank}of{len(self.layouts)}:{block_hash:016x}"

    # --- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()

        def run():
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self.store = RedisStore(self._store_config)
            self._queue = asyncio.Queue()
            self._pusher = loop.create_task(self._push_loop())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="tandem-kv-tier", daemon=True)
        self._thread.start()
        ready.wait(timeout=10)

    def stop(self) -> None:
        if self._loop is None:
            return
        loop, self._loop = self._loop, None

        async def close():
            self._pusher.cancel()
            await self.store.close()

        try:
            asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=5)
        except (concurrent.futures.TimeoutError, RuntimeError):
            pass
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=5)

    # --- offload (write-back on eviction) ------------------------------------------------------------------

    def offer(self, block_hashes: list[int], per_rank_kv: list[torch.Tensor]) -> None:
        """Engine thread: blocks just evicted, [num_layers, 2, n, block_size, kv_heads, head_dim] per rank. Only
        queued here; encoding and pushing happen on the tier's thread."""
        num_bytes = len(block_hashes) * self.block_bytes
        loop = self._loop
        with self._pending_lock:
            if loop is None or self._pending_bytes + num_bytes > self.config.max_pending_bytes:
                self.stats["push_dropped_blocks"] += len(block_hashes)
                return
            self._pending_bytes += num_bytes
        loop.call_soon_threadsafe(self._queue.put_nowait, (block_hashes, per_rank_kv, num_bytes))

    async def _push_loop(self) -> None:
        while True:
            block_hashes, per_rank_kv, num_bytes = await self._queue.get()
            try:
                await self._push(block_hashes, per_rank_kv)
            except RedisUnavailable as e:
                with self._pending_lock:
                    self.stats["push_dropped_blocks"] += len(block_hashes)
                self.last_error = f"push: {e}"
                log.debug("kv tier: push skipped: %s", e)
            except Exception:  # noqa: BLE001 - the tier is an optimisation: log, never crash the worker
                self.stats["errors"] += 1
                log.exception("kv tier: push failed")
            finally:
                with self._pending_lock:
                    self._pending_bytes -= num_bytes

    async def _push(self, block_hashes: list[int], per_rank_kv: list[torch.Tensor]) -> None:
        now = time.monotonic()
        self._forget_expired(now)
        ttl_ms = int(self.config.ttl_s * 1000)
        batch: list[tuple[str, bytes]] = []
        for i, block_hash in enumerate(block_hashes):
            for layout, kv in zip(self.layouts, per_rank_kv):
                key = self.key(layout.tp_rank, block_hash)
                if key in self._written:
                    continue  # still there, from an earlier eviction of the same block
                batch.append((key, encode_block(layout, block_hash, kv[:, :, i])))
            if sum(len(v) for _, v in batch) >= self.config.batch_bytes or i == len(block_hashes) - 1:
                if batch:
                    await self._write(batch, ttl_ms, now)
                batch = []

    async def _write(self, batch: list[tuple[str, bytes]], ttl_ms: int, now: float) -> None:
        num_bytes = sum(len(v) for _, v in batch)
        stale = []
        while self._written and self._written_bytes + num_bytes > self.config.max_bytes:
            key, (n, _) = self._written.popitem(last=False)
            self._written_bytes -= n
            stale.append(key)

        async def write(r):
            pipe = r.pipeline(transaction=False)
            if stale:
                pipe.delete(*stale)
            for key, value in batch:
                pipe.set(key, value, px=ttl_ms)
            return await pipe.execute()

        # Off every request's path: bounded, but loosely (10 MB/s at worst), so that a busy host does not make a
        # slow write count as Redis failing.
        await self.store.call(write, timeout_s=1.0 + num_bytes / 10e6)
        expires = now + self.config.ttl_s
        for key, value in batch:
            self._written[key] = (len(value), expires)
            self._written_bytes += len(value)
        self.stats["deleted_blocks"] += len(stale)
        self.stats["pushed_blocks"] += len(batch) // len(self.layouts)
        self.stats["pushed_bytes"] += num_bytes

    def _forget_expired(self, now: float) -> None:
        while self._written:
            key, (n, expires) = next(iter(self._written.items()))
            if expires > now:
                return
            self._written.popitem(last=False)
            self._written_bytes -= n

    # --- pull ----------------------------------------------------------------------------------------------

    async def pull_async(self, token_ids: list[int], num_cached_tokens: int) -> PulledKV | None:
        """From any event loop: the KV of the blocks after the locally cached prefix (num_cached_tokens) that
        Redis holds, if the cost model says pulling them beats recomputing; None otherwise or on any failure."""
        loop = self._loop
        if loop is None:
            return None
        fut = asyncio.run_coroutine_threadsafe(self._pull(list(token_ids), num_cached_tokens // self.block_size), loop)
        return await asyncio.wrap_future(fut)

    async def _pull(self, token_ids: list[int], num_cached_blocks: int) -> PulledKV | None:
        max_blocks = (len(token_ids) - 1) // self.block_size  # the last token is always computed, for its logits
        if num_cached_blocks >= max_blocks or not self.store.available:
            return None
        self.stats["lookups"] += 1
        start = time.perf_counter()
        result = "error"
        try:
            result, pulled = await self._fetch(token_ids, num_cached_blocks, max_blocks, start)
            return pulled
        except RedisUnavailable as e:
            self.stats["errors"] += 1
            self.last_error = f"pull: {e}"
            log.debug("kv tier: pull skipped: %s", e)
        except ChecksumError as e:
            self.stats["checksum_failures"] += 1
            log.warning("kv tier: %s; recomputing", e)
        except BlockFormatError as e:
            self.stats["errors"] += 1
            log.warning("kv tier: %s; recomputing", e)
        except Exception:  # noqa: BLE001 - never fail a request for the tier
            self.stats["errors"] += 1
            log.exception("kv tier: pull failed; recomputing")
        finally:
            if self.on_wait is not None:
                self.on_wait(time.perf_counter() - start, result)
        return None

    async def _fetch(self, token_ids: list[int], first: int, end: int,
                     start: float) -> tuple[str, PulledKV | None]:
        """(result, the pulled KV): result is hit, miss or skipped (the cost model chose to recompute)."""
        bs = self.block_size
        block_hashes = hash_token_blocks(token_ids[: end * bs], bs, self.hash_extra)[first:]
        # Which blocks does Redis hold? Rank 0's keys, in one round trip; a missing rank shows up in the MGET.
        keys = [self.key(0, h) for h in block_hashes]

        async def exists(r):
            pipe = r.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return await pipe.execute()

        held = await self.store.call(exists, timeout_s=self.config.lookup_timeout_s)
        self.cost.observe_rtt(time.perf_counter() - start)
        num_blocks = next((i for i, n in enumerate(held) if not n), len(held))
        if num_blocks == 0:
            self.stats["misses"] += 1
            return "miss", None
        estimate = self.cost.estimate(num_blocks * self.block_bytes, num_blocks * bs)
        if not estimate.pays:
            self.stats["skipped"] += 1
            return "skipped", None
        deadline = start + min(self.config.pull_timeout_s, estimate.recompute_s)
        blocks: list[list[torch.Tensor]] = [[] for _ in self.layouts]
        per_batch = max(1, self.config.batch_bytes // self.block_bytes)
        num_bytes = 0
        for lo in range(0, num_blocks, per_batch):
            hashes = block_hashes[lo : min(lo + per_batch, num_blocks)]
            batch_keys = [self.key(layout.tp_rank, h) for h in hashes for layout in self.layouts]
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise RedisUnavailable(f"pull: past its deadline of {deadline - start:.3f} s")
            values = await self.store.call(lambda r: r.mget(batch_keys), timeout_s=remaining)
            for j, (key, value) in enumerate(zip(batch_keys, values)):
                if value is None:
                    self.stats["misses"] += 1
                    return "miss", None  # expired or evicted since the EXISTS
                h, layout = hashes[j // len(self.layouts)], self.layouts[j % len(self.layouts)]
                try:
                    blocks[layout.tp_rank].append(decode_block(layout, h, value))
                except BlockFormatError:
                    await self._discard(key)
                    raise
                num_bytes += len(value)
        seconds = time.perf_counter() - start
        self.cost.observe_pull(num_bytes, seconds)
        if self.on_pull_latency is not None:
            self.on_pull_latency(seconds)
        self.stats["hits"] += 1
        self.stats["pulled_blocks"] += num_blocks
        self.stats["pulled_bytes"] += num_bytes
        return "hit", PulledKV(token_ids, first, [torch.stack(rank_blocks, dim=2) for rank_blocks in blocks])

    async def _discard(self, key: str) -> None:
        """A bad value: delete it, so that no other worker pulls it."""
        try:
            await self.store.call(lambda r: r.delete(key), timeout_s=self.config.lookup_timeout_s)
        except RedisUnavailable:
            pass

    # --- engine thread / observations ------------------------------------------------------------------------

    def insert(self, engine, pulled: PulledKV) -> int:
        """Engine thread: adopt pulled blocks into the engine's prefix cache; returns the leading blocks cached."""
        try:
            num_cached = engine.insert_cached_blocks(pulled.token_ids, pulled.start_block, pulled.per_rank_kv)
        except Exception:  # noqa: BLE001 - the request recomputes instead
            self.stats["errors"] += 1
            log.exception("kv tier: inserting pulled blocks failed; recomputing")
            return 0
        self.stats["hit_tokens"] += max(0, num_cached - pulled.start_block) * self.block_size
        return num_cached

    def observe_prefill(self, num_computed_tokens: int, seconds: float) -> None:
        self.cost.observe_prefill(num_computed_tokens, seconds)
