"""The router's view of the workers: who exists (the registry), how loaded each is (GetStats), who is down.

Down means: a call to it failed as if it were gone (UNAVAILABLE), or it stalled: it answered no GetStats for
`worker_stall_timeout_s`. A stalled process (stopped, swapping, a hung host) keeps its TCP connections open, so its
calls neither fail nor progress; the router cancels every call in flight there (`WorkerHandle.calls`) and the
requests move on as if it had died. A down worker is polled less often and comes back when it answers again.

One grpc.aio channel per worker, opened when the registry first lists it and closed when the registry drops it.
Load estimates add this router's requests that a worker's stats may not show yet, so that a burst of requests
between two reports spreads out instead of landing on the same worker: a request counts from dispatch until its
first token from that worker (prefill done, or first decode message) and one stats report asked for after that.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable

import grpc

from router.cache.prefix_index import PrefixIndex
from router.config import RouterConfig
from router.policy import (Balance, Choice, WorkerLoad, pick_decode, pick_decode_cache_aware, pick_prefill,
                           pick_prefill_cache_aware)
from router.routing import PromptBlocks, Route, match_tokens
from tandem.aio import cancel_and_wait
from tandem.tls import TLSConfig, aio_channel
from tandem.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

# Which worker roles serve each pool, per mode.
POOL_ROLES = {
    "disaggregated": {"prefill": ("prefill", "both"), "decode": ("decode", "both")},
    "colocated": {"both": ("both",)},
}
# HTTP/2 keepalive on the channels to workers: a connection whose peer stops acknowledging pings for
# keepalive_timeout_ms is closed, failing its calls with UNAVAILABLE (a dead host that sent no RST). The workers'
# servers accept pings this often (workers/server.py).
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
# A worker marked down is polled this much less often until it answers again.
DOWN_POLL_FACTOR = 5
# Calls still running on the channel of a worker the registry dropped get this long before it closes.
CHANNEL_CLOSE_GRACE_S = 30.0


class _Pending:
    __slots__ = ("num_tokens", "num_blocks", "settled_at")

    def __init__(self, num_tokens: int, num_blocks: int):
        self.num_tokens = num_tokens  # prompt tokens it still has to compute there
        self.num_blocks = num_blocks
        self.settled_at: float | None = None  # when it produced its first token there


class WorkerHandle:
    """One worker: its channel, last stats, up/down state and this router's requests its stats may not show."""

    def __init__(self, info: worker_pb2.WorkerInfo, now: float, tls: TLSConfig | None = None):
        self.info = info
        self.worker_id = info.worker_id
        self.role = info.role
        self.channel = aio_channel(info.address, tls, CHANNEL_OPTIONS)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.stats: worker_pb2.WorkerStats | None = None
        self.stats_issued_at = 0.0  # when the GetStats that `stats` answers was sent
        self.stats_answered_at = now  # when it last answered one (from when it was listed)
        self.listed_at = now
        self.down_since: float | None = None
        self.pending: dict[int, _Pending] = {}  # by ticket
        self.poller: asyncio.Task | None = None
        # Prefill and Decode calls in flight there (register with track()); cancelled when the worker stalls.
        self.calls: set[grpc.aio.Call] = set()
        self.num_stalls = 0  # times it was found stalled: a call cancelled by a stall sees it change

    def track(self, call: grpc.aio.Call) -> int:
        """Register an in-flight call (cancelled if the worker stalls); returns the stall count to compare with
        later (`stalled_since`). Untrack with `calls.discard(call)` when it ends."""
        self.calls.add(call)
        return self.num_stalls

    def stalled_since(self, num_stalls: int) -> bool:
        """The worker was found stalled after track() returned `num_stalls`: its calls were cancelled by the pool,
        not by their request."""
        return self.num_stalls != num_stalls

    @property
    def is_up(self) -> bool:
        return self.stats is not None and self.down_since is None

    def load(self) -> WorkerLoad:
        stats = self.stats
        num_tokens = num_blocks = 0
        for p in self.pending.values():
            num_tokens += p.num_tokens
            num_blocks += p.num_blocks
        return WorkerLoad(
            worker_id=self.worker_id,
            num_waiting_tokens=stats.num_waiting_tokens + num_tokens,
            num_free_blocks=stats.num_free_blocks - num_blocks,
            num_running=stats.num_running + stats.num_waiting + len(self.pending),
        )

    def forget_reported(self) -> None:
        """Drop requests that a stats report asked for after their first token shows."""
        issued_at = self.stats_issued_at
        stale = [t for t, p in self.pending.items() if p.settled_at is not None and p.settled_at < issued_at]
        for ticket in stale:
            del self.pending[ticket]


class WorkerPool:
    """Polls the registry and the workers; picks workers for prefill and decode.

    `on_change` is called (synchronously, on the event loop) whenever a pool may have gained or lost its last
    live worker.

    `prefix_index` is the hook of cache-aware routing: the global prefix index (router/cache/prefix_index.py) that
    the router's KV-events follower keeps up to date, or None (no Redis, or not followed yet). It is read on every
    choice, so it may be set or replaced at any time; with None, or routing_policy "load", workers are chosen by
    load alone.
    """

    def __init__(self, config: RouterConfig, model_name: str, on_change: Callable[[], None] = lambda: None,
                 prefix_index: PrefixIndex | None = None):
        self.config = config
        self.model_name = model_name
        self.on_change = on_change
        self.prefix_index = prefix_index
        self._balance = Balance(config.balance_abs_threshold, config.balance_rel_threshold)
        self.workers: dict[str, WorkerHandle] = {}
        self._pool_roles = POOL_ROLES[config.mode]
        self._decode_pool = "decode" if config.mode == "disaggregated" else "both"
        self._tickets = itertools.count()
        self._registry_ok: bool | None = None
        self._ignored: set[str] = set()
        self._channel = aio_channel(config.registry_address, config.internal_tls)
        self._registry = worker_pb2_grpc.RegistryStub(self._channel)
        self._task: asyncio.Task | None = None
        self._closers: set[asyncio.Task] = set()

    @property
    def decode_pool(self) -> str:
        """The pool decode calls go to: "decode", or "both" in colocated mode."""
        return self._decode_pool

    async def start(self) -> None:
        await self.poll_registry()
        self._task = asyncio.create_task(self._registry_loop(), name="router-registry")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *(w.poller for w in self.workers.values())) if t is not None]
        await cancel_and_wait(*tasks)
        await asyncio.gather(*(w.channel.close() for w in self.workers.values()), return_exceptions=True)
        await cancel_and_wait(*self._closers)
        self.workers.clear()
        await self._channel.close()

    # --- choosing -------------------------------------------------------------------------------------------

    def live_workers(self, pool: str) -> list[WorkerHandle]:
        """Up and taking new requests: a draining worker (leaving its pool) finishes what it has and gets no more."""
        roles = self._pool_roles[pool]
        return [w for w in self.workers.values() if w.is_up and w.role in roles and not w.info.draining]

    def num_live(self, pool: str) -> int:
        return len(self.live_workers(pool))

    def is_ready(self) -> bool:
        """Every pool has a live worker."""
        return all(self.live_workers(pool) for pool in self._pool_roles)

    def choose_prefill(self, exclude: frozenset[str] | set[str] = frozenset(),
                       prompt: PromptBlocks | None = None) -> Route | None:
        """A prefill worker for `prompt` (router/policy.py); None when no live one is left outside `exclude`."""
        workers = [w for w in self.live_workers("prefill") if w.worker_id not in exclude]
        return self._choose(workers, prompt, pick_prefill, lambda loads, cached: pick_prefill_cache_aware(
            loads, len(prompt), cached, self._balance))

    def choose_decode(self, exclude: frozenset[str] | set[str] = frozenset(),
                      prompt: PromptBlocks | None = None) -> Route | None:
        """A decode worker (of the "both" pool in colocated mode) for `prompt`; None when none is left."""
        workers = [w for w in self.live_workers(self._decode_pool) if w.worker_id not in exclude]
        block_size = {w.worker_id: max(w.info.block_size, 1) for w in workers}
        return self._choose(workers, prompt, pick_decode, lambda loads, cached: pick_decode_cache_aware(
            loads, {wid: n // block_size[wid] for wid, n in cached.items()}, self._balance))

    def has_index(self, workers: list[WorkerHandle]) -> bool:
        """Cache-aware routing can use the prefix index for these workers: policy cache_aware, an index, and it
        knows at least one of them (workers that publish no KV events are otherwise scored as cold)."""
        index = self.prefix_index
        return (self.config.routing_policy == "cache_aware" and index is not None
                and any(w.worker_id in index.workers for w in workers))

    def _choose(self, workers: list[WorkerHandle], prompt: PromptBlocks | None,
                by_load: Callable[[list[WorkerLoad]], str | None],
                cache_aware: Callable[[list[WorkerLoad], dict[str, int]], Choice | None]) -> Route | None:
        if not workers:
            return None
        loads = [w.load() for w in workers]
        if prompt is None or not self.has_index(workers):
            reason = "load" if prompt is None or self.config.routing_policy == "load" else "no_index"
            return Route(self.workers[by_load(loads)], reason)
        cached = match_tokens(self.prefix_index, prompt, workers)
        choice = cache_aware(loads, cached)
        return Route(self.workers[choice.worker_id], choice.reason, cached.get(choice.worker_id, 0))

    def max_model_len(self, pools: tuple[str, ...] | None = None) -> int | None:
        """The smallest context among the live workers of `pools` (all pools by default); None without any."""
        lens = [w.info.max_model_len for p in (pools or tuple(self._pool_roles)) for w in self.live_workers(p)]
        return min(lens, default=None)

    # --- accounting -----------------------------------------------------------------------------------------

    def dispatch(self, worker: WorkerHandle, num_prompt_tokens: int, num_blocks: int) -> int:
        """Count a request sent to `worker` in its load: until finish(), or settle() and the next stats report."""
        ticket = next(self._tickets)
        worker.pending[ticket] = _Pending(num_prompt_tokens, num_blocks)
        return ticket

    def settle(self, worker: WorkerHandle, ticket: int) -> None:
        """The request produced its first token there: its prompt is computed, and stats asked for from now on
        count it."""
        p = worker.pending.get(ticket)
        if p is not None and p.settled_at is None:
            p.num_tokens = 0
            p.settled_at = time.monotonic()

    def finish(self, worker: WorkerHandle, ticket: int) -> None:
        """The request is gone from `worker` (or never got there)."""
        worker.pending.pop(ticket, None)

    def mark_down(self, worker: WorkerHandle, why: str = "is unavailable") -> None:
        """A call failed as if the worker were gone: skip it until the registry lists it again with fresh stats."""
        if worker.down_since is None:
            log.warning("worker %s (%s, %s) %s; routing around it", worker.worker_id, worker.role,
                        worker.info.address, why)
            worker.down_since = time.monotonic()
            self.on_change()

    def mark_stalled(self, worker: WorkerHandle) -> None:
        """The worker answered no stats for `worker_stall_timeout_s`: mark it down and cancel its calls, whose
        requests then move to other workers (their Abort reaches it if it wakes up)."""
        silent_s = time.monotonic() - worker.stats_answered_at
        worker.num_stalls += 1
        self.mark_down(worker, f"answered no stats for {silent_s:.1f} s (stalled)")
        calls, worker.calls = worker.calls, set()
        for call in calls:
            call.cancel()

    # --- polling --------------------------------------------------------------------------------------------

    async def _registry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.registry_poll_interval_s)
            await self.poll_registry()

    async def poll_registry(self) -> None:
        try:
            resp = await self._registry.ListWorkers(
                worker_pb2.ListWorkersRequest(), timeout=max(1.0, self.config.registry_poll_interval_s))
        except grpc.aio.AioRpcError as e:
            if self._registry_ok is not False:
                log.warning("registry %s: %s: %s (keeping the last known workers)", self.config.registry_address,
                            e.code().name, e.details())
            self._registry_ok = False
            return
        if self._registry_ok is False:
            log.info("registry %s is reachable again", self.config.registry_address)
        self._registry_ok = True
        self._apply_listing(resp)

    def _apply_listing(self, resp: worker_pb2.ListWorkersResponse) -> None:
        now = time.monotonic()
        listed = {}
        for info in resp.workers:
            if info.model != self.model_name:
                if info.worker_id not in self._ignored:
                    self._ignored.add(info.worker_id)
                    log.warning("ignoring worker %s at %s: it serves %r, this router serves %r",
                                info.worker_id, info.address, info.model, self.model_name)
                continue
            if info.role not in ("prefill", "decode", "both"):
                continue
            listed[info.worker_id] = info
        changed = False
        for worker_id in [w for w in self.workers if w not in listed]:
            self._remove(self.workers.pop(worker_id))
            changed = True
        for worker_id, info in listed.items():
            worker = self.workers.get(worker_id)
            if worker is None:
                worker = self.workers[worker_id] = WorkerHandle(info, now, self.config.internal_tls)
                worker.poller = asyncio.create_task(self._stats_loop(worker), name=f"router-stats-{worker_id}")
                log.info("worker %s joined: %s at %s", worker_id, info.role, info.address)
            else:
                worker.listed_at = now
                if info.draining and not worker.info.draining:
                    log.info("worker %s is draining: no new requests go there", worker_id)
                    changed = True
                worker.info = info
                changed |= self._maybe_revive(worker)
        if changed:
            self.on_change()

    def _remove(self, worker: WorkerHandle) -> None:
        log.info("worker %s left: %s at %s", worker.worker_id, worker.role, worker.info.address)
        if worker.poller is not None:
            worker.poller.cancel()
        # Calls still running there (a registry hiccup, not a death) may finish; new ones go elsewhere.
        closer = asyncio.create_task(worker.channel.close(grace=CHANNEL_CLOSE_GRACE_S))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)

    def _maybe_revive(self, worker: WorkerHandle) -> bool:
        down = worker.down_since
        if down is not None and worker.listed_at > down and worker.stats_issued_at > down:
            log.info("worker %s is back", worker.worker_id)
            worker.down_since = None
            return True
        return False

    async def _stats_loop(self, worker: WorkerHandle) -> None:
        """GetStats every `stats_poll_interval_s`; a call that gets no answer within what is left of
        `worker_stall_timeout_s` since the last answer marks the worker stalled."""
        request = worker_pb2.GetStatsRequest()
        interval, stall_timeout = self.config.stats_poll_interval_s, self.config.worker_stall_timeout_s
        while True:
            issued_at = time.monotonic()
            up = worker.down_since is None
            # Up: the deadline is when the silence reaches the stall timeout (at least one interval away). Down:
            # a whole timeout, so that a slow answer revives it.
            timeout = (max(worker.stats_answered_at + stall_timeout - issued_at, interval) if up and worker.stats
                       else stall_timeout)
            try:
                stats = await worker.stub.GetStats(request, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    self.mark_down(worker)
                elif e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and worker.stats is not None and (
                        up or worker.calls):  # down already (a failed call), but some calls still wait there
                    self.mark_stalled(worker)
            else:
                first = worker.stats is None
                worker.stats, worker.stats_issued_at = stats, issued_at
                worker.stats_answered_at = time.monotonic()
                worker.forget_reported()
                if self._maybe_revive(worker) or first:
                    self.on_change()
            await asyncio.sleep(interval if worker.down_since is None else interval * DOWN_POLL_FACTOR)
