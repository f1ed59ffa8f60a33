"""A worker process: one LLMEngine in a background step loop, served over gRPC as `tandem.v1.Worker`.

Threads:
- the engine thread runs `EngineLoop`: it applies queued commands between steps, steps while there is work,
  and hands each TokenEvent to the listener registered for its request;
- a grpc.aio server runs on its own event loop thread (`WorkerServer`); its handlers talk to the engine only
  through `EngineLoop.call` and listeners, never by touching engine state directly;
- the KV transport serves and fetches payloads on its own threads.

KV hand-off (prefill role): as soon as a request's first token is sampled, the engine thread exports its
prompt KV and stages it on the transport under a transfer id; the blocks stay held until the decode worker
confirms the fetch, the request is aborted, or its lease expires. Nothing is held past the lease.

Telemetry (`Telemetry("tandem-worker")` unless one is given): Prefill and Decode calls carry the router's trace
context in their metadata; the handlers record the spans `prefill` (the worker that computed the prompt),
`kv_transfer` (the decode worker's pull) and `decode` (first decoding step to the last token) under it, after the
fact, with the engine's timestamps. Metrics (workers/metrics.py) are served as Prometheus text on
`GET /metrics` at `metrics_port`, from the gRPC server's event loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import grpc
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode

from tandem.telemetry import Telemetry, epoch_ns_from_monotonic, extract, start_metrics_server
from tandem.tls import TLSConfig, add_port
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc
from workers.config import EngineConfig
from workers.engine import LLMEngine
from workers.kv_events import KVEventPublisher, KVEventsConfig
from workers.kv_tier import KVTierConfig, RemoteKVTier, engine_layouts
from workers.kv_transfer import KVTransferError, make_kv_transport
from workers.metrics import WorkerMetrics
from workers.outputs import TokenEvent
from workers.wire import FINISH_REASONS, logprobs_to_proto, sampling_params_from_proto

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "both")


@dataclass(frozen=True)
class WorkerConfig:
    role: str = "both"
    # LLMEngine options (EngineConfig.from_kwargs names: model, max_num_seqs, block_size, ...).
    engine: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    worker_id: str = ""
    kv_transport: str = "tcp"
    # How long KV stays held for a decode worker that has not fetched it yet.
    kv_lease_s: float = 30.0
    kv_fetch_timeout_s: float = 30.0
    # Bounded waiting queue: past it, new requests get RESOURCE_EXHAUSTED.
    max_waiting_requests: int = 512
    torch_threads: int | None = None
    # Prometheus `GET /metrics` on `host`: 0 picks a free port (WorkerInfo.metrics_address says which), -1: off.
    metrics_port: int = 0
    # Mutual TLS on the Worker service and the KV transport (TLSConfig.internal); None: plaintext.
    internal_tls: TLSConfig | None = None
    # Redis for KV events (the global prefix index) and the remote KV tier; None: neither.
    redis_url: str | None = None
    # How often the KV events publisher writes this worker's snapshot (its TTL in Redis is twice that).
    kv_events_interval_s: float = 2.0
    # Remote KV tier (workers/kv_tier): offload evicted prefix blocks to Redis and pull them back when that beats
    # recomputing; how long they live there, and the most this worker keeps there.
    kv_offload: bool = False
    kv_offload_ttl_s: float = 600.0
    kv_offload_max_bytes: int = 512 << 20
    # engine tensor_parallel_size > 1 with ranks 1..N-1 started by the cluster (cluster/tp_ranks.py): where they meet
    # this worker's rank 0 (tcp://host:port). None: the engine spawns them itself.
    tp_init_method: str | None = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role: must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.kv_offload and self.redis_url is None:
            raise ValueError("kv_offload: needs redis_url (the Redis that holds the offloaded KV)")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(
                f"metrics_port: must be in [0, 65535] (0: a free port) or -1 (off), got {self.metrics_port}")
        if self.kv_lease_s <= 0:
            raise ValueError(f"kv_lease_s: must be > 0, got {self.kv_lease_s}")
        if self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests: must be >= 1, got {self.max_waiting_requests}")
        if not self.kv_events_interval_s > 0:
            raise ValueError(f"kv_events_interval_s: must be > 0, got {self.kv_events_interval_s}")


@dataclass
class _Lease:
    req_id: str
    transfer_id: str
    expires: float
    num_bytes: int
    locators: list[str]  # per shard, what its transport's offer returned ("" for none): for the KVHandle


class EngineLoop:
    """Owns the engine: every engine call happens on this thread."""

    def __init__(self, engine: LLMEngine, kv_lease_s: float, torch_threads: int | None = None):
        self.engine = engine
        self.torch_threads = torch_threads
        self.kv_lease_s = kv_lease_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._listeners: dict[str, Callable[[TokenEvent], None]] = {}
        self.leases: dict[str, _Lease] = {}  # by transfer id
        self._lease_by_req: dict[str, str] = {}
        self.lease_s_of: dict[str, float] = {}  # a Prefill's own kv_lease_ms, until its lease is made (engine thread)
        # Set by the server: stage a prefilled request's KV (returns transfer id, bytes, locators), and drop a staged
        # transfer from the transport (a no-op once the decode side has fetched it).
        self.on_prefilled: Callable[[str], tuple[str, int, list[str]] | None] | None = None
        self.withdraw: Callable[[str], object] | None = None
        # Set by the server when it publishes KV events: gets each step's prefix cache changes (engine thread).
        self.on_kv_events: Callable[[list], None] | None = None
        self.num_leases_expired = 0
        self.snapshot = self._snapshot()
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[LLMEngine], object]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine thread between steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        return fut

    def listen(self, req_id: str, listener: Callable[[TokenEvent], None]) -> None:
        self._listeners[req_id] = listener

    def unlisten(self, req_id: str) -> None:
        self._listeners.pop(req_id, None)

    def stop(self) -> None:
        self._stop = True
        self._commands.put((None, None))
        self._thread.join(timeout=30)

    # --- the loop (engine thread) ---------------------------------------------------------------------

    def _run(self) -> None:
        if self.torch_threads:
            # OpenMP's thread count is per calling thread: a new thread starts from OMP_NUM_THREADS (Ray sets
            # it to 1 in actors), whatever the thread that built the engine asked for.
            import torch
            torch.set_num_threads(self.torch_threads)
        try:
            while not self._stop:
                busy = self.engine.has_unfinished_requests()
                self._apply_commands(block=not busy)
                if self._stop:
                    break
                if self.engine.has_unfinished_requests():
                    for event in self.engine.step():
                        self._dispatch(event)
                self._expire_leases()
                self.snapshot = self._snapshot()
                if self.on_kv_events is not None:
                    self.on_kv_events(self.engine.take_kv_events())
        except BaseException as e:  # noqa: BLE001 - a dead engine must be visible, not silent
            log.exception("engine loop died")
            self.error = e
            for listener in list(self._listeners.values()):
                listener(None)

    def _apply_commands(self, block: bool) -> None:
        timeout = 0.05 if block else 0  # wake now and then to expire leases
        while True:
            try:
                fn, fut = self._commands.get(block=block, timeout=timeout) if block else self._commands.get_nowait()
            except queue.Empty:
                return
            block = False
            if fn is None:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(self.engine))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def _dispatch(self, event: TokenEvent) -> None:
        if event.finish_reason is None and self.engine.role == "prefill" and self.on_prefilled is not None:
            # First token of a prefill-role request: stage its KV right away, on this thread, before any
            # later step could touch it.
            staged = self.on_prefilled(event.req_id)
            lease_s = self.lease_s_of.pop(event.req_id, self.kv_lease_s)
            if staged is not None:
                transfer_id, num_bytes, locators = staged
                lease = _Lease(event.req_id, transfer_id, time.monotonic() + lease_s, num_bytes, locators)
                self.leases[transfer_id] = lease
                self._lease_by_req[event.req_id] = transfer_id
        listener = self._listeners.get(event.req_id)
        if listener is not None:
            listener(event)
        if event.finished:
            self._listeners.pop(event.req_id, None)
            self.lease_s_of.pop(event.req_id, None)

    def release_lease(self, transfer_id: str) -> _Lease | None:
        """Engine thread: free the blocks held for a transfer (fetched, aborted or expired) and drop its
        staged payload."""
        lease = self.leases.pop(transfer_id, None)
        if lease is not None:
            self._lease_by_req.pop(lease.req_id, None)
            if self.withdraw is not None:
                self.withdraw(transfer_id)
            self.engine.abort_request(lease.req_id)
        return lease

    def lease_of(self, req_id: str) -> str | None:
        return self._lease_by_req.get(req_id)

    def _expire_leases(self) -> None:
        if not self.leases:
            return
        now = time.monotonic()
        for tid, lease in list(self.leases.items()):
            if lease.expires <= now:
                log.warning("KV lease of %s expired after %.1f s; releasing its blocks", lease.req_id, self.kv_lease_s)
                self.num_leases_expired += 1
                self.release_lease(tid)

    def _snapshot(self) -> dict:
        """The engine's share of WorkerStats, by field name; taken on this thread, read from any."""
        engine = self.engine
        stats = engine.stats()
        # Prompt tokens still to compute: what the prefix cache already holds of a waiting prompt is not queued work
        # (cache-aware routers compare it with the uncached part of a new prompt).
        kv = engine.kv
        waiting_tokens = sum(r.num_tokens - max(r.num_computed_tokens, kv.num_cached_tokens_of(r))
                             for r in engine.scheduler.waiting)
        return dict(
            num_running=stats.num_running, num_waiting=stats.num_waiting, num_waiting_tokens=waiting_tokens,
            num_kv_held=len(self.leases), num_blocks=stats.num_blocks, num_free_blocks=stats.num_free_blocks,
            num_used_blocks=engine.kv.num_used_blocks, kv_cache_usage=stats.kv_cache_usage,
            prefix_cache_queries=stats.prefix_cache_queries, prefix_cache_hits=stats.prefix_cache_hits,
            num_preemptions=stats.num_preemptions, num_prompt_tokens=stats.num_prompt_tokens,
            num_generation_tokens=stats.num_generation_tokens, num_requests_finished=stats.num_requests_finished,
        )


class WorkerServer:
    """The Worker gRPC service around an EngineLoop. `start()` returns the WorkerInfo; `stop()` ends it all.

    `telemetry`: where spans and metrics go; by default its own `Telemetry("tandem-worker")`, shut down by stop().
    """

    def __init__(self, config: WorkerConfig, telemetry: Telemetry | None = None):
        self.config = config
        self.worker_id = config.worker_id or f"{config.role}-{uuid.uuid4().hex[:8]}"
        self._owns_telemetry = telemetry is None
        if telemetry is None:
            telemetry = Telemetry("tandem-worker", resource_attributes={
                "tandem.worker.id": self.worker_id, "tandem.worker.role": config.role})
        self.telemetry = telemetry
        if config.torch_threads:
            import torch
            torch.set_num_threads(config.torch_threads)
        options = dict(config.engine)
        options.setdefault("detokenize", False)
        options["role"] = config.role
        if config.redis_url:
            options.setdefault("enable_kv_cache_events", True)
        self.engine = LLMEngine(EngineConfig.from_kwargs(**options), tp_init_method=config.tp_init_method)
        # The routers' global prefix index is fed from these (workers/kv_events/).
        self.kv_events = KVEventPublisher(
            config.redis_url, self.engine.model_name, self.worker_id, self.engine.block_size,
            KVEventsConfig(interval_s=config.kv_events_interval_s)) if config.redis_url else None
        self.transport = make_kv_transport(config.kv_transport, tls=config.internal_tls)
        self.kv_tier: RemoteKVTier | None = None
        if config.kv_offload and not self.engine.kv.enable_prefix_caching:
            log.warning("kv_offload: off, because enable_prefix_caching is off (the tier feeds the prefix cache)")
        elif config.kv_offload:  # before the engine thread starts: set_kv_offload is the engine's
            self.kv_tier = RemoteKVTier(
                KVTierConfig(config.redis_url, ttl_s=config.kv_offload_ttl_s, max_bytes=config.kv_offload_max_bytes),
                self.engine.model_name, engine_layouts(self.engine), self.engine.kv.hash_extra)
            self.engine.set_kv_offload(self.kv_tier.offer)
        self.loop = EngineLoop(self.engine, config.kv_lease_s, config.torch_threads)
        self.loop.on_prefilled = self._stage_kv
        self.loop.withdraw = self._withdraw
        if self.kv_events is not None:
            self.loop.on_kv_events = self.kv_events.publish
        self.transport.on_fetched = self._on_fetched
        self.kv_transfers = 0
        self.kv_transfer_bytes = 0
        self.kv_transfer_seconds = 0.0
        self.metrics = WorkerMetrics(
            self.telemetry.meter, {"worker_id": self.worker_id, "worker_role": config.role},
            snapshot=lambda: self.loop.snapshot, transfer_stats=lambda: self.transport.stats,
            leases_expired=lambda: self.loop.num_leases_expired,
            kv_events=(lambda: self.kv_events.stats) if self.kv_events is not None else None,
            kv_transport=self.transport.name)
        if self.kv_tier is not None:
            self.metrics.add_kv_tier(self.kv_tier)
        self._aio_loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_runner = None  # aiohttp, serving /metrics
        self.metrics_address = ""
        self._thread: threading.Thread | None = None
        self.info: wpb.WorkerInfo | None = None
        self._fetch_pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="tandem-kv-fetch")

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> wpb.WorkerInfo:
        host = self.config.host
        kv_endpoint = self.transport.start(host)
        if self.kv_tier is not None:
            self.kv_tier.start()
        ready = threading.Event()
        failure: list[BaseException] = []
        bound: list[int] = []

        def run():
            loop = asyncio.new_event_loop()
            self._aio_loop = loop
            asyncio.set_event_loop(loop)
            try:
                bound.append(loop.run_until_complete(self._serve(host, self.config.port)))
            except BaseException as e:  # noqa: BLE001
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="tandem-worker-grpc", daemon=True)
        self._thread.start()
        ready.wait(timeout=60)
        if failure:
            raise failure[0]
        if not bound:
            raise TimeoutError(f"worker {self.worker_id}: its gRPC server did not start within 60 s")
        port = bound[0]
        self.info = wpb.WorkerInfo(
            worker_id=self.worker_id, role=self.config.role, address=f"{host}:{port}",
            model=self.engine.model_name, max_model_len=self.engine.max_model_len,
            block_size=self.engine.block_size, tp_size=self.engine.executor.tp_size,
            kv_transport=self.transport.name, pid=os.getpid(), node_ip=host, metrics_address=self.metrics_address,
        )
        self._kv_endpoint = kv_endpoint
        log.info("worker %s (%s) serving on %s:%d, KV transport %s at %s", self.worker_id, self.config.role, host,
                 port, self.transport.name, kv_endpoint)
        return self.info

    async def _serve(self, host: str, port: int) -> int:
        """Start the gRPC server; returns the port it bound (port 0: one the OS picked)."""
        # Routers send keepalive pings every 10 s (router/pool.py CHANNEL_OPTIONS), also on idle connections.
        self._server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                                                ("grpc.keepalive_permit_without_calls", 1)])
        worker_pb2_grpc.add_WorkerServicer_to_server(_Servicer(self), self._server)
        bound = add_port(self._server, f"{host}:{port}", self.config.internal_tls)
        if bound == 0:
            raise OSError(f"port: cannot listen on {host}:{port}")
        await self._server.start()
        if self.kv_events is not None:
            await self.kv_events.start()
        if self.config.metrics_port >= 0:
            self._metrics_runner, self.metrics_address = await start_metrics_server(
                self.telemetry, host, self.config.metrics_port)
        return bound

    def stop(self) -> None:
        if self._aio_loop is not None and self._server is not None:
            fut = asyncio.run_coroutine_threadsafe(self._stop_serving(), self._aio_loop)
            try:
                fut.result(timeout=10)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
            self._aio_loop.call_soon_threadsafe(self._aio_loop.stop)
        self.loop.stop()
        if self.kv_tier is not None:
            self.kv_tier.stop()
        self.transport.close()
        self._fetch_pool.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()
        if self._owns_telemetry:
            self.telemetry.shutdown()

    async def _stop_serving(self) -> None:
        await self._server.stop(grace=1.0)
        if self.kv_events is not None:
            await self.kv_events.close()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None

    # --- KV hand-off ----------------------------------------------------------------------------------

    def _stage_kv(self, req_id: str) -> tuple[str, int, list[str]] | None:
        """Engine thread, right after a prefill-role request's first token. Rank 0 gathered every TP rank's shard
        (export_kv); all of them are staged on this worker's transport, shard r under shard_transfer_id(tid, r, n).
        Returns the transfer id, the bytes of all shards and each shard's locator (one-sided reads; "" for none)."""
        start = time.perf_counter()
        payloads = self.engine.export_kv(req_id, on_device=self.transport.takes_device_payloads)
        transfer_id = f"{req_id}/{uuid.uuid4().hex[:8]}"
        locators = [self.transport.offer(shard_transfer_id(transfer_id, rank, len(payloads)), payload) or ""
                    for rank, payload in enumerate(payloads)]
        self.metrics.record_stage(time.perf_counter() - start, self.transport.name, len(payloads))
        return transfer_id, sum(p.num_bytes for p in payloads), locators

    def _withdraw(self, transfer_id: str) -> None:
        n = self.engine.executor.tp_size
        for rank in range(n):
            self.transport.withdraw(shard_transfer_id(transfer_id, rank, n))

    def _on_fetched(self, shard_id: str) -> None:
        """Transport thread: the decode side confirmed a shard; free the blocks once it has the last one (it
        fetches them in rank order)."""
        transfer_id, rank = _split_shard_id(shard_id)
        if rank == self.engine.executor.tp_size - 1:
            self.loop.call(lambda engine: self.loop.release_lease(transfer_id))

    def stats(self) -> wpb.WorkerStats:
        return wpb.WorkerStats(
            info=self.info, **self.loop.snapshot, kv_transfers=self.kv_transfers, kv_transfer_bytes=self.kv_transfer_bytes,
            kv_transfer_seconds=self.kv_transfer_seconds, kv_leases_expired=self.loop.num_leases_expired,
            kv_fetch_seconds=self.transport.stats["seconds_receiving"],
        )


def shard_transfer_id(transfer_id: str, rank: int, num_shards: int) -> str:
    """The transport id of one TP rank's KV shard of a hand-off (the transfer id itself with a single shard)."""
    return transfer_id if num_shards == 1 else f"{transfer_id}#{rank}"


def _split_shard_id(shard_id: str) -> tuple[str, int]:
    transfer_id, sep, rank = shard_id.rpartition("#")
    return (transfer_id, int(rank)) if sep else (shard_id, 0)


class _RequestStream:
    """Engine events of one request, handed from the engine thread to the request's asyncio handler."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, event: TokenEvent | None) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _ms(seconds: float | None) -> float:
    return 0.0 if seconds is None else max(seconds, 0.0) * 1000.0


def _error_of(e: BaseException, context) -> tuple[str, str]:
    """(error.type, message) of a failed call: the gRPC code it was aborted with, else the exception's type."""
    if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
        return CANCELLED, "the call was cancelled"
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return code.name, str(context.details() or e)
    return type(e).__name__, str(e)


CANCELLED = grpc.StatusCode.CANCELLED.name
MAX_KV_LEASE_MS = 3_600_000  # a Prefill's own lease: blocks held for a decode worker, never for longer than this


class _CallSpans:
    """The spans of one Prefill or Decode call, children of the router's span (its `traceparent` in the call's
    metadata). Recorded when the call ends, with explicit times: no span stays open while tokens stream."""

    def __init__(self, server: WorkerServer, context, req: wpb.EngineRequest):
        self.tracer = server.telemetry.tracer
        self.tp_size = server.engine.executor.tp_size
        self.parent: Context | None = extract(context.invocation_metadata())
        self.attributes = {
            "gen_ai.request.id": req.request_id, "gen_ai.request.model": server.engine.model_name,
            "gen_ai.usage.prompt_tokens": len(req.prompt_token_ids), "tandem.worker.id": server.worker_id,
        }

    def prefill(self, received: float, event: TokenEvent | None, end: float, error: tuple[str, str] | None) -> None:
        """From the call's arrival to the first token; `event`: that token's (None if it never came)."""
        attributes = {}
        if event is not None and event.first_scheduled_time is not None:
            attributes = {
                "gen_ai.latency.time_in_queue": max(event.first_scheduled_time - received, 0.0),
                "gen_ai.latency.time_in_model_prefill": max(end - event.first_scheduled_time, 0.0),
                "tandem.num_cached_tokens": event.num_cached_tokens,
            }
        self._record("prefill", received, end, attributes, error)

    def kv_transfer(self, handle: wpb.KVHandle, start: float, end: float, error: tuple[str, str] | None) -> None:
        self._record("kv_transfer", start, end, {
            "tandem.kv_transfer.bytes": handle.num_bytes, "tandem.kv_transfer.transport": handle.transport,
            "tandem.kv_transfer.num_blocks": handle.num_blocks, "tandem.kv_transfer.prefill_tp_size": handle.tp_size,
            "tandem.kv_transfer.decode_tp_size": self.tp_size,
            "tandem.kv_transfer.source_worker_id": handle.source_worker_id,
        }, error)

    def decode(self, start: float, end: float, num_tokens: int, error: tuple[str, str] | None) -> None:
        """`num_tokens`: sent by this call (with a local prefill, its first token too)."""
        self._record("decode", start, end, {"gen_ai.usage.completion_tokens": num_tokens}, error)

    def _record(self, name: str, start: float, end: float, attributes: dict, error: tuple[str, str] | None) -> None:
        span = self.tracer.start_span(name, context=self.parent, attributes={**self.attributes, **attributes},
                                      start_time=epoch_ns_from_monotonic(start))
        if error is not None:
            span.set_attribute("error.type", error[0])
            # The router cancels a decode call when a stop string matched: not a failure.
            if error[0] != CANCELLED:
                span.set_status(Status(StatusCode.ERROR, error[1]))
        span.end(end_time=epoch_ns_from_monotonic(end))


class _Servicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, server: WorkerServer):
        self.w = server
        self.loop = server.loop

    async def _engine(self, fn):
        return await asyncio.wrap_future(self.loop.call(fn))

    async def _check_serving(self, context) -> None:
        if self.loop.error is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.w.worker_id}: engine failed: {self.loop.error}")

    async def _admit(self, context) -> None:
        await self._check_serving(context)
        waiting = self.loop.snapshot["num_waiting"]
        if waiting >= self.w.config.max_waiting_requests:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"worker {self.w.worker_id}: waiting queue is full "
                                f"({waiting} >= max_waiting_requests={self.w.config.max_waiting_requests})")

    @staticmethod
    def _params(req: wpb.EngineRequest):
        return sampling_params_from_proto(req.sampling, with_stop_strings=False)

    async def _add(self, context, req: wpb.EngineRequest, stream: _RequestStream, lease_s: float | None = None) -> None:
        """Queue a request that prefills here; bad input aborts the call with INVALID_ARGUMENT. `lease_s`: how long
        its KV waits for a decode worker (None: the worker's kv_lease_s)."""
        req_id = req.request_id
        self.loop.listen(req_id, stream)
        try:
            params = self._params(req)
            pulled = await self._pull_kv(list(req.prompt_token_ids) + list(req.output_token_ids))

            def add(e):
                if pulled is not None:
                    self.w.kv_tier.insert(e, pulled)  # the same engine call: nothing can evict them in between
                if lease_s is not None:
                    self.loop.lease_s_of[req_id] = lease_s
                return e.add_request(list(req.prompt_token_ids), params, req_id, req.priority,
                                     list(req.output_token_ids))

            await self._engine(add)
        except ValueError as e:
            self.loop.unlisten(req_id)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def _pull_kv(self, token_ids: list[int]):
        """The remote tier's blocks after the locally cached prefix, if pulling pays (off the engine thread)."""
        if self.w.kv_tier is None:
            return None
        # A read-only lookup, as MatchPrefix: a stale answer only makes the engine skip blocks it has meanwhile.
        return await self.w.kv_tier.pull_async(token_ids, self.w.engine.kv.num_cached_prefix_tokens(token_ids))

    def _observe_prefill(self, event: TokenEvent, prefilled_at: float) -> None:
        if self.w.kv_tier is not None and event.first_scheduled_time is not None:
            self.w.kv_tier.observe_prefill(event.num_prompt_tokens - event.num_cached_tokens,
                                           prefilled_at - event.first_scheduled_time)

    async def _abort(self, req_id: str) -> None:
        self.loop.unlisten(req_id)

        def abort(engine):
            self.loop.lease_s_of.pop(req_id, None)
            tid = self.loop.lease_of(req_id)
            if tid is not None:
                self.loop.release_lease(tid)
            return engine.abort_request(req_id) is not None or tid is not None

        return await self._engine(abort)

    async def Prefill(self, request: wpb.PrefillRequest, context) -> wpb.PrefillResponse:
        received = time.monotonic()
        spans = _CallSpans(self.w, context, request.request)
        await self._admit(context)
        req = request.request
        stream = _RequestStream(asyncio.get_running_loop())
        if request.kv_lease_ms > MAX_KV_LEASE_MS:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"kv_lease_ms: must be <= {MAX_KV_LEASE_MS} (an "
                                f"hour; 0: the worker's kv_lease_s), got {request.kv_lease_ms}")
        await self._add(context, req, stream, request.kv_lease_ms / 1000 if request.kv_lease_ms else None)
        done = False
        event = prefilled_at = error = None
        try:
            event = await stream.queue.get()
            if event is None:
                await self._check_serving(context)
            prefilled_at = time.monotonic()
            done = True
            self._observe_prefill(event, prefilled_at)
            resp = wpb.PrefillResponse(
                token_ids=event.new_token_ids, logprobs=logprobs_to_proto(event.new_token_ids, event.logprobs),
                finish_reason=FINISH_REASONS[event.finish_reason], num_cached_tokens=event.num_cached_tokens,
                queue_ms=_ms(event.first_scheduled_time - event.arrival_time),
                prefill_ms=_ms(prefilled_at - event.first_scheduled_time),
            )
            if isinstance(event.stop_reason, int):
                resp.stop_token_id = event.stop_reason
            if not event.finished:
                # The engine thread registered the lease before it handed over this event; reading it here
                # spares a wait for the engine's next step on every prefill's path to the first token.
                tid = self.loop.lease_of(req.request_id)
                lease = self.loop.leases.get(tid) if tid else None
                tp_size = self.w.engine.executor.tp_size  # rank 0 staged every rank's shard
                if lease is None:
                    await context.abort(grpc.StatusCode.INTERNAL, f"request_id: {req.request_id!r}: KV was not staged")
                resp.kv.CopyFrom(wpb.KVHandle(
                    transfer_id=tid, transport=self.w.transport.name, endpoints=[self.w._kv_endpoint] * tp_size, tp_size=tp_size,
                    num_blocks=-(-len(req.prompt_token_ids) // self.w.engine.block_size), num_bytes=lease.num_bytes,
                    source_worker_id=self.w.worker_id, locators=lease.locators,
                ))
            return resp
        except BaseException as e:
            error = _error_of(e, context)
            raise
        finally:
            if not done:  # cancelled, deadline, or failed before the first token: nothing may stay held
                await self._abort(req.request_id)
            spans.prefill(received, event, prefilled_at or time.monotonic(), error)

    async def Decode(self, request: wpb.DecodeRequest, context):
        received = time.monotonic()
        spans = _CallSpans(self.w, context, request.request)
        await self._admit(context)
        req = request.request
        req_id = req.request_id
        with_kv = request.HasField("kv")
        stream = _RequestStream(asyncio.get_running_loop())
        first = wpb.DecodeResponse()
        finished = False
        # For the spans: the local prefill's first event and when it came, when decoding started and ended.
        first_event = prefilled_at = decode_start = last_token_at = error = None
        num_tokens = 0
        try:
            if with_kv:
                try:
                    params = self._params(req)
                except ValueError as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
                payloads, seconds = await self._fetch(request.kv, context, spans)
                payload = payloads[0]
                first.kv_transfer_ms = seconds * 1000.0
                first.kv_transfer_bytes = sum(p.num_bytes for p in payloads)
                self.loop.listen(req_id, stream)

                def adopt(engine):
                    try:
                        # Regrouped to this worker's TP size when the prefill group's differs.
                        return engine.import_kv(payloads, params, req_id, req.priority)
                    except RuntimeError:
                        # No free blocks right now: queue it as a local prefill from the prompt and the first
                        # token instead; the scheduler runs it once blocks free up.
                        return engine.add_request(payload.prompt_token_ids, params, req_id, req.priority,
                                                  payload.output_token_ids)

                try:
                    await self._engine(adopt)
                except ValueError as e:
                    self.loop.unlisten(req_id)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"kv: {e}")
                # The KV is in the engine's cache now: hand the received buffers back to the transport's pool,
                # rather than holding them for as long as this request decodes.
                payloads = payload = None
                decode_start = time.monotonic()
            else:
                await self._add(context, req, stream)
            while True:
                event = await stream.queue.get()
                if event is None:
                    await self._check_serving(context)
                num_tokens += len(event.new_token_ids)
                msg = wpb.DecodeResponse(
                    token_ids=event.new_token_ids, logprobs=logprobs_to_proto(event.new_token_ids, event.logprobs),
                    finish_reason=FINISH_REASONS[event.finish_reason], num_cached_tokens=event.num_cached_tokens,
                )
                if isinstance(event.stop_reason, int):
                    msg.stop_token_id = event.stop_reason
                if first is not None:
                    if not with_kv:
                        first_event = event
                        prefilled_at = decode_start = time.monotonic()
                        self._observe_prefill(event, prefilled_at)
                        if event.first_scheduled_time is not None:
                            first.queue_ms = _ms(event.first_scheduled_time - event.arrival_time)
                            first.prefill_ms = _ms(prefilled_at - event.first_scheduled_time)
                    msg.MergeFrom(first)
                    first = None
                finished = event.finished
                if finished:
                    last_token_at = time.monotonic()
                yield msg
                if finished:
                    return
        except BaseException as e:
            error = _error_of(e, context)
            raise
        finally:
            if not finished:  # the router cancelled (stop string, client gone) or the deadline passed
                await self._abort(req_id)
            end = last_token_at or time.monotonic()
            if not with_kv:
                spans.prefill(received, first_event, prefilled_at or end, None if first_event else error)
            # A local request that finished with its first token did no decoding.
            if decode_start is not None and (with_kv or num_tokens > 1 or not finished):
                spans.decode(decode_start, end, num_tokens, error)

    async def _fetch(self, handle: wpb.KVHandle, context, spans: _CallSpans):
        start = time.monotonic()
        error = None
        try:
            return await self._pull(handle, context)
        except BaseException as e:
            error = _error_of(e, context)
            raise
        finally:
            spans.kv_transfer(handle, start, time.monotonic(), error)

    async def _pull(self, handle: wpb.KVHandle, context):
        if handle.transport != self.w.transport.name:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"kv: transport {handle.transport!r} does not match this worker's {self.w.transport.name!r}")
        num_shards = max(handle.tp_size, 1)
        if len(handle.endpoints) != num_shards:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"kv: endpoints: one per TP rank ({num_shards}), got {len(handle.endpoints)}")
        if len(handle.locators) not in (0, num_shards):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"kv: locators: none or one per TP rank ({num_shards}), got {len(handle.locators)}")
        locators = list(handle.locators) or [""] * num_shards
        timeout = self.w.config.kv_fetch_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, remaining)
        start = time.perf_counter()

        def fetch_all() -> tuple[list, float]:
            # In rank order: the prefill worker frees the blocks when the last shard is acknowledged. All on one
            # thread, so that the event loop (busy streaming tokens under load) takes part only once per pull.
            payloads = [self.w.transport.fetch(endpoint, shard_transfer_id(handle.transfer_id, rank, num_shards),
                                               max(timeout - (time.perf_counter() - start), 0.0), locators[rank])
                        for rank, endpoint in enumerate(handle.endpoints)]
            # The transfer ends when this process holds every byte; the event loop's wait to take the result is
            # the decode's, as the engine's wait to import it is.
            return payloads, time.perf_counter()

        try:
            payloads, end = await asyncio.get_running_loop().run_in_executor(self.w._fetch_pool, fetch_all)
        except KVTransferError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"kv: {e}")
        seconds = end - start
        num_bytes = sum(p.num_bytes for p in payloads)
        self.w.kv_transfers += 1
        self.w.kv_transfer_bytes += num_bytes
        self.w.kv_transfer_seconds += seconds
        self.w.metrics.record_fetch(seconds, num_bytes, self.w.transport.name, num_shards,
                                    self.w.engine.executor.tp_size)
        return payloads, seconds

    async def Abort(self, request: wpb.AbortRequest, context) -> wpb.AbortResponse:
        n = 0
        for req_id in request.request_ids:
            n += bool(await self._abort(req_id))
        return wpb.AbortResponse(num_aborted=n)

    async def MatchPrefix(self, request: wpb.MatchPrefixRequest, context) -> wpb.MatchPrefixResponse:
        # Read-only lookups of the block pool's hash table, off the engine thread: waiting for a step (tens to
        # hundreds of ms) would add to every routed request's TTFT. A stale answer only misroutes one prefill.
        n = self.w.engine.kv.num_cached_prefix_tokens(list(request.token_ids))
        return wpb.MatchPrefixResponse(num_cached_tokens=n)

    async def GetStats(self, request, context) -> wpb.WorkerStats:
        return self.w.stats()
