"""The semantic response cache: opted-in, deterministic requests answered from earlier answers to the same question
asked in other words, per tenant, without touching a worker.

Where things live:
  - every router holds an index (index.py) of all entries of its model: embeddings, prompts and answers, in
    memory; a lookup is an embedding (embedder.py, on a thread) plus a dot product, and reads no Redis;
  - Redis holds the entries, so that a restarted router and the other routers have them (plain Redis 7 or Valkey
    commands only: hashes, sorted sets, a stream):
      tandem:semcache:<model>:<tenant>:<id>   hash: prompt, params_key, embedding (float32 bytes), token_ids,
                                              text, finish_reason, prompt_tokens, created_at; PX = ttl_s
      tandem:semcache_ids:<model>:<tenant>    sorted set of the tenant's ids by created_at (the cap's order)
      tandem:semcache_log:<model>             stream of {op: add|del, tenant, id}, MAXLEN ~ 10000
    (<model> and <tenant> are percent-encoded, so that a ':' in a name cannot reach another tenant's keys);
  - at start a router reads every entry of its model (SCAN + HGETALL) after noting the stream's end, then polls
    the stream every poll_interval_s for other routers' adds and deletes.
Redis is never on a request's path: an answer is indexed here at once and written in the background; with Redis
down the cache still answers from this router's index, and what it learns stays local until Redis returns.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote

import numpy as np

from router.cache.semantic.config import SemanticCacheConfig
from router.cache.semantic.embedder import EMBEDDING_DIM, BatchingEmbedder, EmbedderBusy
from router.cache.semantic.index import CacheEntry, Match, SemanticIndex
from router.cache.semantic.metrics import SemanticCacheMetrics
from router.cache.semantic.query import SemanticQuery, cache_tenant, check_opt_in
from router.tenants import Tenant
from tandem.aio import cancel_and_wait
from tandem.redis_store import RedisStore, RedisUnavailable, StoreConfig

log = logging.getLogger(__name__)

STREAM_MAXLEN = 10_000
# Entries read per Redis round trip while rebuilding or following.
READ_BATCH = 200
# Finish reasons an answer may be cached with: complete answers only.
CACHEABLE = ("stop", "length")


@dataclass
class Lookup:
    """One opted-in request's lookup: its scope, query and embedding (reused to store its answer), and the hit."""

    tenant: str
    query: SemanticQuery
    embedding: np.ndarray | None
    hit: CacheEntry | None


class SemanticCache:
    """Lifecycle: `await start()` (rebuild from Redis and follow it in the background), `await stop()`."""

    def __init__(self, config: SemanticCacheConfig, redis_url: str, model_name: str, telemetry=None,
                 embedder: BatchingEmbedder | None = None):
        self.config = config
        self.model_name = model_name
        # Background use only (never on a request's path): a longer timeout than the default's 100 ms.
        self.store = RedisStore(StoreConfig(redis_url, socket_timeout_s=1.0))
        self.index = SemanticIndex(config.max_entries_per_tenant, config.max_entries)
        self.embedder = embedder or BatchingEmbedder(timeout_s=config.embed_timeout_s)
        self.metrics = telemetry.instruments(SemanticCacheMetrics) if telemetry is not None else None
        if self.metrics is not None:
            self.metrics.observe_entries(lambda: (self.index.num_entries(), len(self.index.tenants)))
        self._model_key = quote(model_name, safe="")
        self._log_key = self.store.key("semcache_log", self._model_key)
        self._last_id: bytes | None = None  # the stream entry read last; None until rebuilt
        self._tasks: set[asyncio.Task] = set()

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for coro in (self._sync_loop(), self._warm_up()):
            task = loop.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks, timeout_s=2.0)
        await self.store.close()

    @property
    def synced(self) -> bool:
        """The index was rebuilt from Redis (and follows it)."""
        return self._last_id is not None

    @property
    def ready(self) -> bool:
        """Rebuilt from Redis, and the embedding model loaded (until then lookups are skipped: misses)."""
        return self.synced and self.embedder.loaded

    async def _warm_up(self) -> None:
        try:
            await self.embedder.warm_up()  # loads the model on its thread before the first request needs it
        except Exception:
            log.exception("semantic cache: the embedding model failed to load; lookups will be misses")

    # --- requests -------------------------------------------------------------------------------------------

    async def lookup(self, query: SemanticQuery, tenant: str) -> Lookup:
        """The best entry of `tenant` for `query`, or a miss; never raises for the cache's own troubles."""
        start = time.perf_counter()
        config, now = self.config, time.time()
        match = self.index.lookup(tenant, query.params_key, query.text, None, config.similarity_threshold, now)
        embedding = None
        result = "hit"
        if match.entry is None:
            try:
                embedding = await self.embedder.embed(query.text)
            except EmbedderBusy as e:
                log.info("semantic cache: lookup skipped: %s", e)
                result = "skipped"
            else:
                match = self.index.lookup(tenant, query.params_key, query.text, embedding,
                                          config.similarity_threshold, time.time())
                result = _result(match)
        if self.metrics is not None:
            self.metrics.lookups.add(1, {"result": result})
            self.metrics.lookup_duration.record(time.perf_counter() - start)
        return Lookup(tenant, query, embedding, match.entry)

    def remember(self, lookup: Lookup, token_ids: list[int], text: str, finish_reason: str, prompt_tokens: int,
                 spawn) -> None:
        """Index a finished answer now and write it to Redis in the background (`spawn(coro)`). Only complete
        answers are kept: finish_reason stop, or length when the client chose max_tokens."""
        if finish_reason not in CACHEABLE or not token_ids or lookup.hit is not None:
            return
        if finish_reason == "length" and not lookup.query.explicit_max_tokens:
            return
        now = time.time()
        entry = CacheEntry(uuid.uuid4().hex[:16], lookup.tenant, lookup.query.params_key, lookup.query.text,
                           lookup.embedding, tuple(token_ids), text, finish_reason, prompt_tokens, now,
                           now + self.config.ttl_s)
        if lookup.embedding is not None:
            self.index.add(entry)
        spawn(self._store(entry))

    async def _store(self, entry: CacheEntry) -> None:
        if entry.embedding is None:  # its lookup got no embedding in time: try once more, off the request
            try:
                entry = _with_embedding(entry, await self.embedder.embed(entry.prompt_text))
            except EmbedderBusy:
                return
            self.index.add(entry)
        status = "stored"
        try:
            await self._write(entry)
        except RedisUnavailable as e:
            log.debug("semantic cache: entry kept in this router only: %s", e)
            status = "redis_unavailable"
        if self.metrics is not None:
            self.metrics.stores.add(1, {"status": status})

    # --- Redis ----------------------------------------------------------------------------------------------

    def _entry_key(self, tenant: str, entry_id: str) -> str:
        return self.store.key("semcache", self._model_key, quote(tenant, safe=""), entry_id)

    def _ids_key(self, tenant: str) -> str:
        return self.store.key("semcache_ids", self._model_key, quote(tenant, safe=""))

    async def _write(self, entry: CacheEntry) -> None:
        key, ids_key = self._entry_key(entry.tenant, entry.entry_id), self._ids_key(entry.tenant)
        ttl_ms = int(self.config.ttl_s * 1000)
        mapping = {
            "tenant": entry.tenant, "prompt": entry.prompt_text, "params_key": entry.params_key,
            "embedding": np.asarray(entry.embedding, dtype=np.float32).tobytes(),
            "token_ids": json.dumps(list(entry.token_ids)), "text": entry.text,
            "finish_reason": entry.finish_reason, "prompt_tokens": entry.prompt_tokens,
            "created_at": repr(entry.created_at),
        }

        async def write(r):
            async with r.pipeline(transaction=False) as p:
                p.hset(key, mapping=mapping)
                p.pexpire(key, ttl_ms)
                p.zadd(ids_key, {entry.entry_id: entry.created_at})
                p.zremrangebyscore(ids_key, "-inf", entry.created_at - self.config.ttl_s)  # expired ids
                p.pexpire(ids_key, ttl_ms)
                p.xadd(self._log_key, {"op": "add", "tenant": entry.tenant, "id": entry.entry_id},
                       maxlen=STREAM_MAXLEN, approximate=True)
                p.zcard(ids_key)
                return await p.execute()

        num_ids = (await self.store.call(write))[-1]
        excess = num_ids - self.config.max_entries_per_tenant
        if excess <= 0:
            return

        async def trim(r):
            popped = await r.zpopmin(ids_key, excess)
            if popped:
                async with r.pipeline(transaction=False) as p:
                    for member, _ in popped:
                        entry_id = member.decode()
                        p.delete(self._entry_key(entry.tenant, entry_id))
                        p.xadd(self._log_key, {"op": "del", "tenant": entry.tenant, "id": entry_id},
                               maxlen=STREAM_MAXLEN, approximate=True)
                    await p.execute()

        await self.store.call(trim)

    async def _sync_loop(self) -> None:
        while True:
            try:
                if self._last_id is None:
                    await self._rebuild()
                else:
                    while await self._follow() == READ_BATCH:
                        pass
            except RedisUnavailable as e:
                log.debug("semantic cache: redis unavailable: %s", e)
            except Exception:  # a malformed entry or a bug: logged, and the loop goes on
                log.exception("semantic cache: sync failed")
            self.index.remove_expired(time.time())
            await asyncio.sleep(self.config.poll_interval_s)

    async def _rebuild(self) -> None:
        """Every entry of this model in Redis; the stream position noted first, so later writes are followed."""
        tail = await self.store.call(lambda r: r.xrevrange(self._log_key, count=1))
        last_id = tail[0][0] if tail else b"0-0"
        pattern = self.store.key("semcache", self._model_key, "*")
        cursor, keys = 0, []
        while True:
            cursor, batch = await self.store.call(lambda r: r.scan(cursor, match=pattern, count=1000))
            keys.extend(batch)
            if not cursor:
                break
        entries = []
        for i in range(0, len(keys), READ_BATCH):
            entries += await self._read(keys[i:i + READ_BATCH])
        for entry in sorted(entries, key=lambda e: e.created_at):  # the cap evicts in insertion order
            self.index.add(entry)
        self._last_id = last_id
        log.info("semantic cache: %d entries of %s read from redis", len(entries), self.model_name)

    async def _follow(self) -> int:
        """Apply other routers' adds and deletes since the last read; returns how many stream entries were read."""
        items = await self.store.call(
            lambda r: r.xrange(self._log_key, min=b"(" + self._last_id, count=READ_BATCH))
        adds = []
        for stream_id, fields in items:
            op, tenant, entry_id = (fields.get(k, b"").decode() for k in (b"op", b"tenant", b"id"))
            if op == "del":
                self.index.remove(tenant, entry_id)
            elif op == "add" and (tenant, entry_id) not in self.index:
                adds.append(self._entry_key(tenant, entry_id))
        for entry in await self._read(adds):
            self.index.add(entry)
        if items:
            self._last_id = items[-1][0]
        return len(items)

    async def _read(self, keys: list) -> list[CacheEntry]:
        if not keys:
            return []

        async def read(r):
            async with r.pipeline(transaction=False) as p:
                for key in keys:
                    p.hgetall(key)
                return await p.execute()

        values = await self.store.call(read)
        entries = []
        for key, fields in zip(keys, values):
            entry = self._parse(key.decode() if isinstance(key, bytes) else key, fields)
            if entry is not None:
                entries.append(entry)
        return entries

    def _parse(self, key: str, fields: dict) -> CacheEntry | None:
        """An entry from its hash, or None (expired meanwhile, or not this version's). Its tenant is the one its
        key names: the scope never comes from the value alone."""
        if not fields:
            return None
        try:
            tenant, entry_id = (unquote(part) for part in key.rsplit(":", 2)[-2:])
            if fields[b"tenant"].decode() != tenant:
                return None
            embedding = np.frombuffer(fields[b"embedding"], dtype=np.float32)
            if embedding.shape != (EMBEDDING_DIM,):
                return None
            created_at = float(fields[b"created_at"])
            return CacheEntry(entry_id, tenant, fields[b"params_key"].decode(), fields[b"prompt"].decode(),
                              embedding, tuple(json.loads(fields[b"token_ids"])), fields[b"text"].decode(),
                              fields[b"finish_reason"].decode(), int(fields[b"prompt_tokens"]), created_at,
                              created_at + self.config.ttl_s)
        except (KeyError, ValueError, UnicodeDecodeError):
            log.warning("semantic cache: skipping malformed entry %s", key)
            return None


async def open_lookup(cache: SemanticCache | None, query: SemanticQuery, params, tenant: Tenant) -> Lookup:
    """A request's lookup: its opt-in refused by name when it cannot be honoured, its scope resolved
    (query.cache_tenant), then the index searched."""
    check_opt_in(cache is not None, params)
    scope = cache_tenant(tenant, query.tenant_id)
    return await cache.lookup(query, scope)


def _result(match: Match) -> str:
    if match.entry is not None:
        return "hit"
    return "guarded" if match.rejected_by is not None else "miss"


def _with_embedding(entry: CacheEntry, embedding: np.ndarray) -> CacheEntry:
    return replace(entry, embedding=embedding)
