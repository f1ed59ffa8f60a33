"""The router process: a grpc.aio server for tandem.v1.Generation and tandem.v1.Cluster, plus health and reflection.

Routers keep no state that other routers need: any number can run against one registry.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Coroutine

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import OVERALL_HEALTH
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from router.admission import Admission
from router.auth import AuthInterceptor, grpc_tenant
from router.cache.kv_events_follower import KVEventsFollower
from router.cache.prefix_index import PrefixIndex
from router.cache.semantic import TENANT_METADATA, SemanticCache
from router.cache.semantic.metrics import SemanticCacheMetrics
from router.config import RouterConfig
from router.convert import check_request_id, generate_input_from_proto, new_request_id, prompt_from_tokenize_request
from router.errors import RouterError
from router.http_server import MAX_BODY_BYTES, OpenAIServer
from router.limits import TenantLimits
from router.metrics import PrefixIndexMetrics
from router.model import ServedModel
from router.pool import WorkerPool
from router.request import ABORT_TIMEOUT_S, GenerateCall, RouterServices
from router.tenants import KeyStore
from tandem.telemetry import Telemetry
from tandem.tls import add_port
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
CLUSTER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Cluster"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Trailing metadata that names the request on a call ended by an error status (responses carry it otherwise).
REQUEST_ID_KEY = "request-id"
# Past this, grpc itself refuses a message (RESOURCE_EXHAUSTED) before it is read; up to it, requests larger than
# MAX_BODY_BYTES (the HTTP front's bound too) are INVALID_ARGUMENT.
GRPC_MAX_RECEIVE_BYTES = 4 * MAX_BODY_BYTES
# Trailing metadata of a RESOURCE_EXHAUSTED that retrying could clear: whole seconds to wait, as HTTP's Retry-After.
RETRY_AFTER_KEY = "retry-after"


class Router:
    """Lifecycle: `address = await start()`, `await wait_ready(timeout_s)`, ..., `await stop(grace_s)`.

    `model` skips loading the tokenizer (tests share one); by default it is loaded from `config.model` in start().
    """

    def __init__(self, config: RouterConfig, model: ServedModel | None = None, telemetry: Telemetry | None = None):
        self.config = config
        self.model = model
        # A Telemetry passed in is the caller's to shut down (tests share one exporter between components).
        self._owns_telemetry = telemetry is None
        self.telemetry = telemetry if telemetry is not None else Telemetry("tandem-router")
        self.address: str | None = None
        # The OpenAI-compatible HTTP front's "host:port"; None while not serving it (config.http_port=-1).
        self.http_address: str | None = None
        self.draining = False
        self.pool: WorkerPool | None = None
        self.admission = Admission(config.pools, config.max_queued_requests, config.max_queue_time_s)
        self.keys = KeyStore(config.tenancy)
        self.services: RouterServices | None = None
        self.semantic_cache: SemanticCache | None = None
        self.num_active = 0
        self._server: grpc.aio.Server | None = None
        self._http: OpenAIServer | None = None
        self._health = health_aio.HealthServicer()
        self._serving: bool | None = None
        self._background: set[asyncio.Task] = set()
        # The global prefix index, fed from the workers' KV events in Redis (None without Redis); the follower
        # starts with the router, once the registry is read.
        self.kv_events: KVEventsFollower | None = None
        self.prefix_index: PrefixIndex | None = PrefixIndex() if config.redis_url else None

    @property
    def redis_state(self) -> str:
        """"up", "down" (serving without the cache), or "off" (no Redis configured)."""
        if self.kv_events is None:
            return "off"
        return "up" if self.kv_events.redis_up else "down"

    async def start(self) -> str:
        """Load the tokenizer, bind, serve, and poll the registry once; returns the gRPC "host:port" listened on
        (`http_address` holds the HTTP one)."""
        config = self.config
        if self.model is None:
            self.model = await asyncio.to_thread(ServedModel.load, config.model, config.load_format)
        if self.model.content_special_tokens != config.chat_content_special_tokens:
            self.model = dataclasses.replace(self.model, content_special_tokens=config.chat_content_special_tokens)
        self.pool = WorkerPool(config, self.model.name, on_change=self._update_health,
                               prefix_index=self.prefix_index)
        self.telemetry.instruments(SemanticCacheMetrics)  # its series exist (at 0) with the cache off too
        self.semantic_cache = (SemanticCache(config.semantic_cache, config.redis_url, self.model.name, self.telemetry)
                               if config.semantic_cache is not None else None)
        self.services = RouterServices(config, self.model, self.pool, self.admission, self._spawn, self.telemetry,
                                       limits=TenantLimits(), semantic_cache=self.semantic_cache)
        # SO_REUSEPORT off: a second router on a taken port must fail, not share it.
        # grpc refuses a message over its receive limit with RESOURCE_EXHAUSTED, which clients read as "queue full,
        # retry": the limit is set above MAX_BODY_BYTES so that the parser below refuses those as INVALID_ARGUMENT.
        options = [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", GRPC_MAX_RECEIVE_BYTES)]
        server = grpc.aio.server(options=options, interceptors=[AuthInterceptor(self.keys)])
        _add_generation_servicer(GenerationServicer(self), server)
        worker_pb2_grpc.add_ClusterServicer_to_server(ClusterServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (GENERATION_SERVICE, CLUSTER_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
        await self._health.set(CLUSTER_SERVICE, SERVING)
        self._update_health()
        host = f"[{config.host}]" if ":" in config.host else config.host
        port = add_port(server, f"{host}:{config.port}", config.ssl)
        if port == 0:
            raise RuntimeError(f"port: could not bind {host}:{config.port}")
        if config.http_port >= 0:
            http = OpenAIServer(self)
            try:
                self.http_address = await http.start(config.host, config.http_port)
            except RuntimeError:
                await server.stop(None)  # frees the gRPC port bound above
                raise
            self._http = http
        await self.pool.start()
        if self.prefix_index is not None:
            pool = self.pool
            self.kv_events = KVEventsFollower(
                config.redis_url, self.model.name, lambda: {w: h.info.block_size for w, h in pool.workers.items()},
                index=self.prefix_index)
            PrefixIndexMetrics(self.telemetry.meter, self.kv_events)
            await self.kv_events.start()
        if self.semantic_cache is not None:
            await self.semantic_cache.start()
        await server.start()
        self._server = server
        self.address = f"{host}:{port}"
        log.info("router serving %s (%s) on %s (gRPC) and %s (HTTP); registry %s", self.model.name, config.mode,
                 self.address, self.http_address or "off", config.registry_address)
        return self.address

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every pool has a live worker with stats; TimeoutError naming the empty pools otherwise."""
        deadline = time.monotonic() + timeout_s
        while not self.pool.is_ready():
            if time.monotonic() >= deadline:
                empty = [p for p in self.config.pools if not self.pool.num_live(p)]
                raise TimeoutError(f"router: no live worker in the {', '.join(empty)} pool after {timeout_s} s")
            await asyncio.sleep(0.02)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: refuse new requests (UNAVAILABLE, HTTP 503), let running ones finish for up to `grace_s`
        (config.drain_timeout_s by default), cancel the rest (their workers get Abort), then stop."""
        if self._server is None:
            return
        grace_s = self.config.drain_timeout_s if grace_s is None else grace_s
        self.draining = True
        await self._health.enter_graceful_shutdown()
        deadline = time.monotonic() + grace_s
        while self.num_active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self._server.stop(grace=None)
        self._server = None
        if self._http is not None:
            await self._http.stop()
            self._http = None
        # Cancelled handlers clean up (spawning their Aborts) when they next run.
        deadline = time.monotonic() + 1.0
        while self.num_active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._background:
            await asyncio.wait(set(self._background), timeout=ABORT_TIMEOUT_S)
        await self.pool.close()
        if self.kv_events is not None:
            await self.kv_events.stop()
        if self.semantic_cache is not None:
            await self.semantic_cache.stop()
        if self._owns_telemetry:
            await asyncio.to_thread(self.telemetry.shutdown)  # flushes OTLP batches: blocking
        log.info("router on %s stopped", self.address)

    def _spawn(self, coro: Coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _update_health(self) -> None:
        serving = not self.draining and self.pool is not None and self.pool.is_ready()
        if serving != self._serving:
            self._serving = serving
            status = SERVING if serving else NOT_SERVING
            for service in (OVERALL_HEALTH, GENERATION_SERVICE):
                self._spawn(self._health.set(service, status))


async def _abort_with(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str,
                      request_id: str | None = None, retry_after_s: float | None = None) -> None:
    metadata = ((REQUEST_ID_KEY, request_id),) if request_id else ()
    if retry_after_s is not None:
        metadata += ((RETRY_AFTER_KEY, str(math.ceil(retry_after_s))),)
    if metadata:
        context.set_trailing_metadata(metadata)
    await context.abort(code, _clip(message))


# The status message travels percent-encoded in a trailer, and trailers past grpc's metadata limit (8 KiB) turn
# the call into RESOURCE_EXHAUSTED: a message that echoes a long client value is cut to this many UTF-8 bytes.
MAX_STATUS_MESSAGE_BYTES = 1024


def _clip(message: str) -> str:
    data = message.encode()
    if len(data) <= MAX_STATUS_MESSAGE_BYTES:
        return message
    return data[:MAX_STATUS_MESSAGE_BYTES].decode(errors="ignore") + " [...]"


def _add_generation_servicer(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """generation_pb2_grpc.add_GenerationServicer_to_server, except that bytes that do not parse as the request
    message (corrupt, or nested past protobuf's depth limit) end the call with INVALID_ARGUMENT: grpc answers a
    deserializer that raises with UNKNOWN, as if the router had failed."""
    methods = {"Generate": (grpc.unary_stream_rpc_method_handler, pb.GenerateRequest, pb.GenerateResponse),
               "ListModels": (grpc.unary_unary_rpc_method_handler, pb.ListModelsRequest, pb.ListModelsResponse),
               "Tokenize": (grpc.unary_unary_rpc_method_handler, pb.TokenizeRequest, pb.TokenizeResponse)}
    handlers = {name: make(_refusing_malformed(getattr(servicer, name), request_type),
                           request_deserializer=_parse_or_error(request_type),
                           response_serializer=response_type.SerializeToString)
                for name, (make, request_type, response_type) in methods.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(GENERATION_SERVICE, handlers),))


def _parse_or_error(message_type):
    def parse(data: bytes):
        if len(data) > MAX_BODY_BYTES:
            return DecodeError(f"the request is {len(data)} bytes; at most {MAX_BODY_BYTES} are accepted")
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return e
    return parse


def _refusing_malformed(method, request_type):
    async def handle(request, context: grpc.aio.ServicerContext):
        if isinstance(request, DecodeError):
            await _abort_with(context, grpc.StatusCode.INVALID_ARGUMENT,
                              f"request: not a valid {request_type.DESCRIPTOR.full_name}: {request}", new_request_id())
        return await method(request, context)
    return handle


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, router: Router):
        self.router = router

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        arrival = time.perf_counter()
        router = self.router
        request_id = new_request_id()
        router.num_active += 1
        try:
            if request.request_id:  # echoed in metadata only once it is known to be safe there
                request_id = check_request_id(request.request_id)
            if router.draining:
                raise RouterError(grpc.StatusCode.UNAVAILABLE, "router is draining")
            metadata = dict(context.invocation_metadata())
            inp = generate_input_from_proto(request, request_id, router.model, metadata.get(TENANT_METADATA))
            operation = "chat" if request.WhichOneof("input") == "chat" else "text_completion"
            await GenerateCall(router.services, inp, context.write, context.time_remaining, arrival,
                               operation=operation, trace_carrier=metadata,
                               tenant=grpc_tenant(router.keys, context)).run()
        except RouterError as e:
            await _abort_with(context, e.code, e.message, request_id, e.retry_after_s)
        except Exception as e:  # a bug: this request fails, the router keeps serving
            log.exception("%s: unexpected error", request_id)
            await _abort_with(context, grpc.StatusCode.INTERNAL, f"router: {type(e).__name__}: {e}", request_id)
        finally:
            router.num_active -= 1

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        router = self.router
        card = pb.ModelCard(id=router.model.name, max_model_len=router.pool.max_model_len() or 0, owned_by="tandem")
        return pb.ListModelsResponse(models=[card])

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext):
        router = self.router
        try:
            ids = prompt_from_tokenize_request(request, router.model)
        except RouterError as e:
            await _abort_with(context, e.code, e.message)
        return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=router.pool.max_model_len() or 0)


class ClusterServicer(worker_pb2_grpc.ClusterServicer):
    def __init__(self, router: Router):
        self.router = router

    async def GetStatus(self, request: worker_pb2.GetStatusRequest, context: grpc.aio.ServicerContext):
        router = self.router
        pool, config = router.pool, router.config
        pools = [
            worker_pb2.PoolStatus(role=name, num_workers=pool.num_live(name),
                                  num_queued=router.admission.num_queued(name), max_queued=config.max_queued_requests)
            for name in config.pools
        ]
        workers = [w.stats if w.stats is not None else worker_pb2.WorkerStats(info=w.info)
                   for w in pool.workers.values()]
        return worker_pb2.ClusterStatus(mode=config.mode, pools=pools, workers=workers,
                                        registry_address=config.registry_address)
