"""One Generate call from admission to its last message: prefill, hand-off, decode, migration and cleanup.

The path of a request:
  disaggregated: Prefill on a prefill worker -> first token to the client -> Decode with the KV handle on a decode
                 worker -> the rest of the tokens.
  local:         Decode without a KV handle (colocated mode, a prompt whose uncached part is short, or no prefill
                 worker live): the decode worker prefills it itself.
Failures that leave the client's stream intact:
  - Prefill: the worker is unavailable -> the same prefill on another prefill worker (max_prefill_retries); none
    left -> the decode worker prefills it (local).
  - Decode: the KV could not be pulled ("kv:" FAILED_PRECONDITION, or the prefill worker stalled during the pull)
    -> Decode again on the same worker without KV, with the first token as output_token_ids
    (kv_load_failure_policy=recompute, the default); with kv_load_failure_policy=fail the request ends with
    UNAVAILABLE instead.
  - Decode: the worker went away mid-stream -> Decode on another decode worker with every token streamed so far
    as output_token_ids (max_migrations). The client sees one stream.
  - A worker that stalls (no stats for worker_stall_timeout_s; router/pool.py) has its calls cancelled by the
    pool: they end as if the worker were gone, and move on as above.
Invariant: when the request ends in any way, every worker call it started that the worker neither finished nor
refused is cancelled and Abort is sent to that worker (unknown ids are ignored there), so no KV stays held for a
request that is gone: not after a cancellation, a deadline, a stop string or a failure elsewhere.

Telemetry: one trace per request. The `router` span (SERVER; a child of the caller's `traceparent` when it sends
one) covers arrival to the last message; `queue` covers arrival to the first dispatch. Prefill and Decode calls
carry the router span's context in their metadata, so the workers' `prefill`, `kv_transfer` and `decode` spans are
its children. The GenAI metrics (router/metrics.py) are recorded at the first token and at the end.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from router.admission import Admission
from router.cache.semantic import SemanticCache, open_lookup
from router.config import RouterConfig
from router.convert import GenerateInput
from router.errors import RouterError
from router.limits import TenantLimits
from router.metrics import RouterMetrics, genai_attributes
from router.model import ServedModel
from router.pool import WorkerHandle, WorkerPool
from router.routing import PromptBlocks, Route
from router.tenants import ANONYMOUS, Tenant
from tandem.telemetry import Telemetry, epoch_ns_from_perf_counter, extract, inject
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import worker_pb2
from workers.detokenizer import IncrementalDetokenizer
from workers.wire import FINISH_REASON_NAMES, sampling_params_to_proto

log = logging.getLogger(__name__)

UNFINISHED = pb.FINISH_REASON_UNSPECIFIED
# The worker went away, or its channel was closed because the registry dropped it.
WORKER_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
# The worker's verdict on the request itself: the client gets the same code.
PASSED_THROUGH = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
ABORT_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class RouterServices:
    """What every request shares: read-mostly state owned by the Router."""

    config: RouterConfig
    model: ServedModel
    pool: WorkerPool
    admission: Admission
    # Runs a coroutine in the background, outliving the request (aborts after a cancellation).
    spawn: Callable[[Coroutine], None]
    # The router process's tracer and meter; None: no spans or metrics.
    telemetry: Telemetry | None = None
    # Per-tenant token buckets (router/limits.py); None: no limits.
    limits: TenantLimits | None = None
    # The semantic response cache (router/cache/semantic/); None: off on this router.
    semantic_cache: SemanticCache | None = None


class _Outcome(enum.Enum):
    DONE = 1  # the request finished and its last message was sent
    KV_LOST = 2  # the decode worker could not pull the KV
    WORKER_LOST = 3  # the decode worker went away before the request finished


class GenerateCall:
    """Runs one request; `send` writes one response to the client, `time_remaining` is the client's deadline."""

    def __init__(self, services: RouterServices, inp: GenerateInput,
                 send: Callable[[pb.GenerateResponse], Awaitable[None]],
                 time_remaining: Callable[[], float | None], arrival: float, *,
                 operation: str = "text_completion", trace_carrier: Mapping[str, str] | None = None,
                 tenant: Tenant = ANONYMOUS):
        self.s = services
        # Who sent it (router/tenants.py): its priority, limits and share of admission.
        self.tenant = tenant
        self._reservation = None  # its tokens in the tenant's bucket, settled at the end
        self.request_id = inp.request_id
        self.prompt = inp.prompt_token_ids
        self.params = inp.params
        self.priority = inp.priority
        self.send = send
        self.time_remaining = time_remaining
        self.arrival = arrival
        # gen_ai.operation.name for metrics and spans: "text_completion" or "chat".
        self.operation = operation
        # The caller's W3C trace context (gRPC metadata or HTTP headers: "traceparent", "tracestate").
        self.trace_carrier = trace_carrier
        self.sampling = sampling_params_to_proto(inp.params, with_stop_strings=False)
        self.detok = IncrementalDetokenizer(services.model.decoder, self.prompt, inp.params)
        self.output_ids: list[int] = []
        self.num_cached_tokens = 0
        # The prompt's block hashes for cache-aware routing (computed on first use), and the route of the worker
        # that computes the prompt (its prediction of num_cached_tokens, for the metrics).
        self.blocks = PromptBlocks(self.prompt, services.pool.model_name)
        self.prompt_route: Route | None = None
        self.prompt_pool = ""
        # The semantic cache, when the request opted in: its query, its lookup, whether it answered.
        self.semantic_query = inp.semantic
        self.semantic = None
        self.semantic_cache_hit = False
        self.max_model_len = 0
        # Worker-side ids are unique per call: a fallback on the same worker must not collide with the call it
        # replaces, and two clients may pick the same request_id.
        self._engine_id_base = f"{self.request_id}-{uuid.uuid4().hex[:8]}"
        self._num_calls = 0
        self._queued: set[str] = set()  # pools this request still counts against
        # engine request id -> worker, for calls not known to have ended on the worker's side.
        self._open: dict[str, WorkerHandle] = {}
        self._kv_engine_id: str | None = None  # the prefill call whose KV a decode worker has not confirmed yet
        # Timings, in ms unless named otherwise.
        self.dispatched_at: float | None = None
        self.first_token_at: float | None = None
        self.worker_queue_ms = 0.0
        self.prefill_ms = 0.0
        self.kv_transfer_ms = 0.0
        self.num_migrations = 0
        self.finish_reason = UNFINISHED
        telemetry = services.telemetry
        self.tracer = telemetry.tracer if telemetry is not None else trace.NoOpTracer()
        self.metrics = telemetry.instruments(RouterMetrics) if telemetry is not None else None
        self.attrs = genai_attributes(operation, services.model.name)
        self.span: Span = INVALID_SPAN  # the request's `router` span, from run()
        self._trace_metadata: tuple[tuple[str, str], ...] = ()  # its context, for the worker calls

    async def run(self) -> None:
        self._start_trace()
        if self.metrics is not None:
            self.metrics.inflight_requests.add(1, self.attrs)
            # A zero makes the series exist before the first migration, so rate() and dashboards see it.
            self.metrics.migrations.add(0, self.attrs)
        error_type = error_message = None
        try:
            await self._run()
            if self.semantic is not None and not self.semantic_cache_hit:
                self.s.semantic_cache.remember(self.semantic, self.output_ids, self.detok.output_text,
                                               FINISH_REASON_NAMES.get(self.finish_reason, ""), len(self.prompt),
                                               self.s.spawn)
        except RouterError as e:
            error_type, error_message = e.code.name, e.message
            raise
        except asyncio.CancelledError:
            error_type, error_message = grpc.StatusCode.CANCELLED.name, "cancelled by the client"
            raise
        except Exception as e:
            # The servicer turns it into INTERNAL.
            error_type, error_message = grpc.StatusCode.INTERNAL.name, f"{type(e).__name__}: {e}"
            self.span.record_exception(e)
            raise
        finally:
            self._cleanup()
            self._record_end(error_type, error_message)

    # --- the path ---------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        config, pool = self.s.config, self.s.pool
        decode_pool = pool.decode_pool
        prompt_len = len(self.prompt)
        self.priority = self.tenant.request_priority(self.priority)
        if self.semantic_query is not None:
            self.semantic = await open_lookup(self.s.semantic_cache, self.semantic_query, self.params, self.tenant)
            if self.semantic.hit is not None:
                await self._answer_from_cache(self.semantic.hit)
                return
        local = config.mode == "colocated" or prompt_len < config.max_local_prefill_length
        if not local and not pool.num_live("prefill") and pool.num_live(decode_pool):
            # Every prefill worker is down or stalled: the decode worker prefills (slower, but served).
            local = True
        pools = (decode_pool,) if local else ("prefill", decode_pool)
        for name in pools:
            if not pool.num_live(name):
                raise RouterError(grpc.StatusCode.UNAVAILABLE, f"{name} pool: no live worker")
        self.max_model_len = pool.max_model_len(pools)
        if prompt_len >= self.max_model_len:
            raise RouterError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input: the prompt has {prompt_len} tokens; it must be shorter than the model's context "
                f"(max_model_len={self.max_model_len})",
            )
        self.s.admission.admit(pools, self.tenant.name, self._timeout(), self.params.max_tokens)
        self._queued.update(pools)
        if self.metrics is not None:
            for name in pools:
                self.metrics.queued_requests.add(1, {"pool": name})
        if self.s.limits is not None:  # after admission: a request refused there costs its tenant nothing
            max_tokens = self.params.max_tokens
            self._reservation = self.s.limits.acquire(
                self.tenant, prompt_len, self.max_model_len - prompt_len if max_tokens is None else max_tokens)

        decode_route = None
        if not local and config.max_local_prefill_length > 0:
            decode_route = pool.choose_decode(prompt=self.blocks)
            if decode_route is None:
                num_cached = 0
            elif decode_route.num_cached_tokens is not None:  # the prefix index's answer: no RPC
                num_cached = decode_route.num_cached_tokens
            else:
                num_cached = await self._match_prefix(decode_route.worker)
            if prompt_len - num_cached < config.max_local_prefill_length:
                local = True
                self._release("prefill", first_token=False)
        kv = None
        if not local:
            decode_route = None  # picked again when the first token is out: loads change during a prefill
            resp = await self._prefill()
            if resp is None:  # every prefill worker failed it: prefill on the decode worker instead
                self._release("prefill", first_token=False)
            else:
                kv = resp.kv if resp.HasField("kv") else None
                if await self._emit(resp.token_ids, resp.logprobs, resp.finish_reason):
                    return
        await self._decode(decode_route or pool.choose_decode(prompt=self.blocks), kv)

    async def _answer_from_cache(self, entry) -> None:
        """A semantic cache hit: the cached tokens as one chunk and the Complete; no worker is touched."""
        self.semantic_cache_hit = True
        self.span.set_attribute("tandem.semantic_cache.hit", True)
        if self.s.limits is not None:  # a hit still counts against the tenant's limits
            self._reservation = self.s.limits.acquire(self.tenant, len(self.prompt), len(entry.token_ids))
        finish = pb.FINISH_REASON_STOP if entry.finish_reason == "stop" else pb.FINISH_REASON_LENGTH
        await self._emit(list(entry.token_ids), [], finish)

    async def _match_prefix(self, worker: WorkerHandle) -> int:
        """How much of the prompt `worker` caches; 0 when it does not answer in time (it is only a hint)."""
        timeout = min(self.s.config.match_prefix_timeout_s, self._timeout() or float("inf"))
        try:
            resp = await worker.stub.MatchPrefix(worker_pb2.MatchPrefixRequest(token_ids=self.prompt), timeout=timeout)
        except grpc.aio.AioRpcError:
            return 0
        return resp.num_cached_tokens

    async def _prefill(self) -> worker_pb2.PrefillResponse | None:
        """The prefill on a prefill worker, retried on others while they fail; None when none is left."""
        config, pool = self.s.config, self.s.pool
        tried: set[str] = set()
        while len(tried) <= config.max_prefill_retries:
            route = pool.choose_prefill(tried, self.blocks)
            if route is None:
                break
            worker = route.worker
            engine_id = self._new_engine_id()
            req = worker_pb2.PrefillRequest(request=self._engine_request(engine_id), kv_lease_ms=config.kv_lease_ms)
            timeout = self._timeout()
            self._on_route("prefill", route)
            # Its load there: the prompt tokens it computes (all of them unless the index says some are cached).
            ticket = self._dispatch(worker, engine_id, len(self.prompt) - (route.num_cached_tokens or 0), 0)
            call = None
            try:
                call = worker.stub.Prefill(req, timeout=timeout, metadata=self._trace_metadata)
                num_stalls = worker.track(call)
                resp = await call
            except BaseException as e:
                pool.finish(worker, ticket)
                if call is not None and not call.done():  # this request was cancelled
                    call.cancel()
                stalled = call is not None and _cancelled_by_stall(worker, num_stalls, e)
                if not (stalled or _worker_gone(e)):
                    if isinstance(e, grpc.aio.AioRpcError):
                        if e.code() in PASSED_THROUGH:
                            self._open.pop(engine_id)  # refused: nothing is held there
                        raise self._worker_error(e, "prefill", worker) from None
                    raise
                # Left open: if the worker is alive after all, the Abort at the end frees what it holds.
                log.warning("%s: prefill worker %s failed (%s); retrying elsewhere", self.request_id,
                            worker.worker_id, "stalled" if stalled else
                            e.code().name if isinstance(e, grpc.aio.AioRpcError) else e)
                pool.mark_down(worker)
                tried.add(worker.worker_id)
                continue
            finally:
                if call is not None:
                    worker.calls.discard(call)
            pool.settle(worker, ticket)  # its KV stays there until a decode worker takes it
            self._release("prefill")
            if resp.finish_reason != UNFINISHED or not resp.HasField("kv"):
                self._open.pop(engine_id)  # no KV is held
            else:
                self._kv_engine_id = engine_id
            self.worker_queue_ms = resp.queue_ms
            self.prefill_ms += resp.prefill_ms
            self.num_cached_tokens = resp.num_cached_tokens
            return resp
        log.warning("%s: no prefill worker left (failed on %s); prefilling on a decode worker", self.request_id,
                    ", ".join(sorted(tried)) or "none")
        return None

    async def _decode(self, route: Route | None, kv: worker_pb2.KVHandle | None) -> None:
        config, pool = self.s.config, self.s.pool
        failed: set[str] = set()
        routed = None
        while True:
            if route is None:
                detail = f" left (failed: {', '.join(sorted(failed))})" if failed else ""
                raise RouterError(grpc.StatusCode.UNAVAILABLE, f"{pool.decode_pool} pool: no live worker{detail}")
            if self.output_ids and self._reached_length():
                # The last worker stopped between sending the last token and saying so.
                await self._complete(pb.FINISH_REASON_LENGTH, None)
                return
            worker = route.worker
            if route is not routed:  # not again for a retry on the same worker after a failed KV pull
                routed = route
                self._on_route(pool.decode_pool, route, computes_prompt=kv is None and not self.output_ids)
            outcome, num_messages = await self._stream(worker, kv)
            if outcome is _Outcome.DONE:
                return
            if outcome is _Outcome.KV_LOST:
                # The prefill worker died or the lease expired (kv_load_failure_policy=recompute; fail raised in
                # _stream): prefill here, after the first token.
                self._abort_held_kv()
                kv = None
                continue
            pool.mark_down(worker)
            failed.add(worker.worker_id)
            if self.num_migrations >= config.max_migrations:
                raise RouterError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{pool.decode_pool} pool: worker {worker.worker_id} failed and the request already moved "
                    f"{self.num_migrations} times (max_migrations={config.max_migrations})",
                )
            self.num_migrations += 1
            self._on_migration(worker)
            log.warning("%s: decode worker %s failed after %d tokens; migrating", self.request_id,
                        worker.worker_id, len(self.output_ids))
            if num_messages:
                # The KV was pulled (and released by the prefill side) and tokens were made: recompute elsewhere.
                kv = None
            route = pool.choose_decode(failed, self.blocks)

    async def _stream(self, worker: WorkerHandle, kv: worker_pb2.KVHandle | None) -> tuple[_Outcome, int]:
        """One Decode call; returns how it ended and how many messages it sent."""
        engine_id = self._new_engine_id()
        req = worker_pb2.DecodeRequest(request=self._engine_request(engine_id), kv=kv)
        num_tokens = len(self.prompt) + len(self.output_ids)
        block_size = max(worker.info.block_size, 1)
        timeout = self._timeout()
        ticket = self._dispatch(worker, engine_id, 0 if kv is not None else num_tokens, num_tokens // block_size + 1)
        num_messages = 0
        call = source = None
        try:
            call = worker.stub.Decode(req, timeout=timeout, metadata=self._trace_metadata)
            num_stalls = worker.track(call)
            # Until its first message the call may be pulling the KV from the prefill worker: if that one stalls,
            # the pull would wait out its own timeout.
            source = self.s.pool.workers.get(kv.source_worker_id) if kv is not None else None
            source_stalls = source.track(call) if source is not None else 0
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    self._open.pop(engine_id)
                    log.warning("%s: decode worker %s ended the stream without a finish_reason",
                                self.request_id, worker.worker_id)
                    return _Outcome.WORKER_LOST, num_messages
                if num_messages == 0:
                    if source is not None:
                        source.calls.discard(call)
                    self.s.pool.settle(worker, ticket)
                    self._on_first_decode_message(msg, kv)
                num_messages += 1
                if msg.finish_reason == pb.FINISH_REASON_ABORT:
                    # Only this router aborts its requests, and not while reading them: the worker is shutting
                    # down or gave up on the request. Either way another worker can carry on.
                    self._open.pop(engine_id)
                    if msg.token_ids:
                        await self._emit(msg.token_ids, msg.logprobs, UNFINISHED)
                    log.warning("%s: decode worker %s aborted the request", self.request_id, worker.worker_id)
                    return _Outcome.WORKER_LOST, num_messages
                if await self._emit(msg.token_ids, msg.logprobs, msg.finish_reason):
                    if msg.finish_reason != UNFINISHED:
                        self._open.pop(engine_id)
                    # Else a stop string matched: the call is cancelled below (and Abort sent on cleanup).
                    return _Outcome.DONE, num_messages
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code in PASSED_THROUGH or code == grpc.StatusCode.FAILED_PRECONDITION:
                self._open.pop(engine_id)  # refused: nothing is held there
            # Else left open, for the Abort at the end: the worker may still be alive (a deadline, a closed channel).
            if code == grpc.StatusCode.FAILED_PRECONDITION and kv is not None and (e.details() or "").startswith("kv:"):
                return self._kv_load_failed(worker, kv, e.details()), num_messages
            if code in WORKER_GONE:
                return _Outcome.WORKER_LOST, num_messages
            raise self._worker_error(e, "decode", worker) from None
        except grpc.aio.UsageError:  # the channel was closed: the registry dropped the worker
            return _Outcome.WORKER_LOST, num_messages
        except asyncio.CancelledError as e:
            if call is not None and _cancelled_by_stall(worker, num_stalls, e):
                # Left open, for the Abort at the end; the cancelled stream also aborts it there if it wakes up.
                log.warning("%s: decode worker %s stalled after %d tokens", self.request_id, worker.worker_id,
                            len(self.output_ids))
                return _Outcome.WORKER_LOST, num_messages
            if source is not None and num_messages == 0 and _cancelled_by_stall(source, source_stalls, e):
                detail = f"prefill worker {source.worker_id} stalled while the KV was pulled"
                return self._kv_load_failed(worker, kv, detail), num_messages
            raise
        finally:
            if call is not None:
                worker.calls.discard(call)
                if source is not None:
                    source.calls.discard(call)
                if not call.done() and engine_id in self._open:
                    call.cancel()  # a stop string, or this request was cancelled
            self.s.pool.finish(worker, ticket)

    def _kv_load_failed(self, worker: WorkerHandle, kv: worker_pb2.KVHandle, detail: str) -> _Outcome:
        """The decode worker could not load the KV its prefill worker holds. kv_load_failure_policy=recompute:
        KV_LOST (Decode again there without KV); fail: RouterError UNAVAILABLE. Either way the held KV is aborted:
        by _decode, or by _cleanup when the request ends."""
        policy = self.s.config.kv_load_failure_policy
        if self.metrics is not None:
            self.metrics.kv_load_failures.add(1, {"action": policy})
        self.span.add_event("kv_load_failure", {"tandem.worker.id": worker.worker_id,
                                                "tandem.kv_transfer.source_worker_id": kv.source_worker_id,
                                                "tandem.kv_load_failure_policy": policy, "message": detail})
        if policy == "fail":
            log.warning("%s: decode worker %s could not load the KV from prefill worker %s (%s); failing the "
                        "request (kv_load_failure_policy=fail)", self.request_id, worker.worker_id,
                        kv.source_worker_id, detail)
            raise RouterError(
                grpc.StatusCode.UNAVAILABLE,
                f"KV hand-off failed: decode worker {worker.worker_id} could not load the KV from prefill worker "
                f"{kv.source_worker_id}: {detail} (kv_load_failure_policy=fail)")
        log.info("%s: decode worker %s could not load the KV from prefill worker %s (%s); prefilling there",
                 self.request_id, worker.worker_id, kv.source_worker_id, detail)
        return _Outcome.KV_LOST

    def _on_first_decode_message(self, msg: worker_pb2.DecodeResponse, kv: worker_pb2.KVHandle | None) -> None:
        self._release(self.s.pool.decode_pool)
        self.prefill_ms += msg.prefill_ms
        self.kv_transfer_ms += msg.kv_transfer_ms
        if kv is not None:
            # The decode worker confirmed the KV, so the prefill worker has let it go.
            self._open.pop(self._kv_engine_id, None)
            self._kv_engine_id = None
        elif not self.output_ids:
            # Prefilled here and this is the first token.
            self.worker_queue_ms = msg.queue_ms
            self.num_cached_tokens = msg.num_cached_tokens

    # --- responses --------------------------------------------------------------------------------------------

    async def _emit(self, token_ids, logprobs, finish_reason: int) -> bool:
        """Send the new tokens as one chunk (and the Complete when finished); True when the request finished."""
        ids = list(token_ids)
        detok = self.detok
        # A worker's "stop" is a stop token id or EOS (workers see no stop strings): its text is left out unless
        # include_stop_str_in_output. A stop string ends the request at the token that completes it, and only
        # after min_tokens tokens (the rules: workers/detokenizer.py).
        stop_str = detok.update(ids, stop_terminated=finish_reason == pb.FINISH_REASON_STOP)
        if stop_str is not None:
            del ids[len(detok.output_token_ids) - len(self.output_ids):]
            finish_reason = pb.FINISH_REASON_STOP
        self.output_ids.extend(ids)
        finished = finish_reason != UNFINISHED
        chunk = pb.Chunk(
            token_ids=ids, text=detok.get_next_text_delta(finished), prompt_tokens=len(self.prompt),
            completion_tokens=len(self.output_ids), cached_tokens=self.num_cached_tokens,
        )
        if self.params.logprobs is not None:
            chunk.logprobs.extend(logprobs[:len(ids)])
        await self.send(pb.GenerateResponse(request_id=self.request_id, chunk=chunk))
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            if self.metrics is not None:
                self.metrics.time_to_first_token.record(self.first_token_at - self.arrival, self.attrs)
        if finished:
            await self._complete(finish_reason, stop_str)
        return finished

    async def _complete(self, finish_reason: int, stop_str: str | None) -> None:
        self.finish_reason = finish_reason
        complete = pb.Complete(
            finish_reason=finish_reason,
            usage=pb.Usage(prompt_tokens=len(self.prompt), completion_tokens=len(self.output_ids),
                           cached_tokens=self.num_cached_tokens, semantic_cache_hit=self.semantic_cache_hit),
            timings=self._timings(),
        )
        if stop_str is not None:
            complete.stop_str = stop_str
        elif (finish_reason == pb.FINISH_REASON_STOP and self.output_ids
              and self.output_ids[-1] in self.params.stop_token_ids):
            complete.stop_token_id = self.output_ids[-1]
        elif finish_reason == pb.FINISH_REASON_ERROR:
            complete.error_message = "the worker reported an error while generating"
        await self.send(pb.GenerateResponse(request_id=self.request_id, complete=complete))

    def _timings(self) -> pb.Timings:
        now = time.perf_counter()
        router_queue_ms = ((self.dispatched_at or now) - self.arrival) * 1e3
        return pb.Timings(
            queue_ms=router_queue_ms + self.worker_queue_ms, prefill_ms=self.prefill_ms,
            kv_transfer_ms=self.kv_transfer_ms, first_token_ms=((self.first_token_at or now) - self.arrival) * 1e3,
            e2e_ms=(now - self.arrival) * 1e3, num_migrations=self.num_migrations,
        )

    # --- telemetry --------------------------------------------------------------------------------------------

    def _start_trace(self) -> None:
        params = self.params
        attributes = {
            "gen_ai.request.id": self.request_id, "gen_ai.request.model": self.attrs["gen_ai.request.model"],
            "gen_ai.operation.name": self.operation, "gen_ai.request.temperature": params.temperature,
            "gen_ai.request.top_p": params.top_p, "gen_ai.usage.prompt_tokens": len(self.prompt),
        }
        if params.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = params.max_tokens
        self.span = self.tracer.start_span(
            "router", context=extract(self.trace_carrier), kind=SpanKind.SERVER, attributes=attributes,
            start_time=epoch_ns_from_perf_counter(self.arrival))
        self._trace_metadata = inject(self.span)

    def _record_queue_span(self) -> None:
        """Arrival to the first dispatch: admission and the prefix-cache probe."""
        span = self.tracer.start_span("queue", context=trace.set_span_in_context(self.span),
                                      start_time=epoch_ns_from_perf_counter(self.arrival))
        span.end(end_time=epoch_ns_from_perf_counter(self.dispatched_at))

    def _on_route(self, pool: str, route: Route, computes_prompt: bool = True) -> None:
        """Count a routing decision; remember the route of the worker that computes the prompt."""
        if computes_prompt:
            self.prompt_route, self.prompt_pool = route, pool
        if self.metrics is not None:
            self.metrics.routing_decisions.add(1, {"pool": pool, "reason": route.reason})

    def _on_migration(self, failed: WorkerHandle) -> None:
        if self.metrics is not None:
            self.metrics.migrations.add(1, self.attrs)
        self.span.add_event("migration", {"tandem.worker.id": failed.worker_id,
                                          "gen_ai.usage.completion_tokens": len(self.output_ids)})

    def _record_end(self, error_type: str | None, error_message: str | None) -> None:
        """The request's metrics and the end of its `router` span; `error_type` is the gRPC code name it failed
        with (None: it finished)."""
        now = time.perf_counter()
        e2e_s = now - self.arrival
        finish = FINISH_REASON_NAMES.get(self.finish_reason) or ""
        if error_type is None and finish == "error":
            error_type, error_message = "worker_error", "the worker reported an error while generating"
        ttft_s = self.first_token_at - self.arrival if self.first_token_at is not None else None
        num_output = len(self.output_ids)
        if error_type is None and self.first_token_at is not None and num_output > 1 and self.dispatched_at is not None:
            self.s.admission.record_finished(self.s.pool.decode_pool, num_output,
                                             (now - self.first_token_at) / (num_output - 1))
        if self.metrics is not None:
            self._record_metrics(error_type, finish, e2e_s, now, num_output)
        span = self.span
        span.set_attribute("gen_ai.usage.completion_tokens", num_output)
        span.set_attribute("gen_ai.latency.e2e", e2e_s)
        span.set_attribute("gen_ai.latency.time_in_queue",
                           ((self.dispatched_at or now) - self.arrival) + self.worker_queue_ms / 1e3)
        if ttft_s is not None:
            span.set_attribute("gen_ai.latency.time_to_first_token", ttft_s)
        if finish:
            span.set_attribute("gen_ai.response.finish_reasons", (finish,))
        span.set_attribute("tandem.num_migrations", self.num_migrations)
        span.set_attribute("tandem.num_cached_tokens", self.num_cached_tokens)
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            if error_type != grpc.StatusCode.CANCELLED.name:  # the client's choice, not a failure of ours
                span.set_status(Status(StatusCode.ERROR, error_message))
        span.end(end_time=epoch_ns_from_perf_counter(now))  # the clock its children were converted from

    def _record_metrics(self, error_type: str | None, finish: str, e2e_s: float, now: float,
                        num_output: int) -> None:
        m, attrs = self.metrics, self.attrs
        m.inflight_requests.add(-1, attrs)
        failed = attrs if error_type is None else {**attrs, "error.type": error_type}
        m.request_duration.record(e2e_s, failed)
        if error_type is None:
            status = "success"
        else:
            status = "cancelled" if error_type == grpc.StatusCode.CANCELLED.name else "error"
        m.requests.add(1, {**failed, "status": status, "finish_reason": finish})
        if self.dispatched_at is not None:  # it reached a worker: its tokens were spent
            m.token_usage.record(len(self.prompt), {**attrs, "gen_ai.token.type": "input"})
            m.token_usage.record(num_output, {**attrs, "gen_ai.token.type": "output"})
        if self.first_token_at is not None and self.prompt_route is not None:
            # The prompt was computed: what the index predicted there against what the worker found cached.
            pool = {"pool": self.prompt_pool}
            m.prefix_cache_prompt_tokens.add(len(self.prompt), pool)
            m.prefix_cache_cached_tokens.add(self.num_cached_tokens, pool)
            m.prefix_cache_predicted_tokens.add(self.prompt_route.num_cached_tokens or 0, pool)
        if error_type is None and self.first_token_at is not None and num_output > 1 and self.dispatched_at is not None:
            m.time_per_output_token.record((now - self.first_token_at) / (num_output - 1), attrs)

    # --- helpers ----------------------------------------------------------------------------------------------

    def _timeout(self) -> float | None:
        """The client's remaining deadline, for a worker call."""
        remaining = self.time_remaining()
        if remaining is not None and remaining <= 0:
            raise RouterError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return remaining

    def _new_engine_id(self) -> str:
        self._num_calls += 1
        return f"{self._engine_id_base}-{self._num_calls}"

    def _engine_request(self, engine_id: str) -> worker_pb2.EngineRequest:
        return worker_pb2.EngineRequest(
            request_id=engine_id, prompt_token_ids=self.prompt, output_token_ids=self.output_ids,
            sampling=self.sampling, priority=self.priority,
        )

    def _dispatch(self, worker: WorkerHandle, engine_id: str, num_prompt_tokens: int, num_blocks: int) -> int:
        if self.dispatched_at is None:
            self.dispatched_at = time.perf_counter()
            self._record_queue_span()
        self._open[engine_id] = worker
        return self.s.pool.dispatch(worker, num_prompt_tokens, num_blocks)

    def _reached_length(self) -> bool:
        max_tokens = self.params.max_tokens
        return ((max_tokens is not None and len(self.output_ids) >= max_tokens)
                or len(self.prompt) + len(self.output_ids) >= self.max_model_len)

    def _release(self, pool: str, first_token: bool = True) -> None:
        if pool in self._queued:
            self._queued.discard(pool)
            self.s.admission.release(pool, self.tenant.name, first_token)
            if self.metrics is not None:
                self.metrics.queued_requests.add(-1, {"pool": pool})

    def _abort_held_kv(self) -> None:
        engine_id, self._kv_engine_id = self._kv_engine_id, None
        worker = self._open.pop(engine_id, None) if engine_id is not None else None
        if worker is not None:
            self.s.spawn(abort(worker, [engine_id]))

    def _worker_error(self, e: grpc.aio.AioRpcError, what: str, worker: WorkerHandle) -> RouterError:
        code, details = e.code(), e.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return RouterError(code, f"deadline exceeded during {what}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return RouterError(code, details)  # the worker's message names the field
        if code in PASSED_THROUGH:
            return RouterError(code, f"{what} worker {worker.worker_id}: {details}")
        return RouterError(grpc.StatusCode.INTERNAL, f"{what} worker {worker.worker_id}: {code.name}: {details}")

    def _cleanup(self) -> None:
        for pool in list(self._queued):
            self._release(pool, first_token=False)
        if self._reservation is not None:
            self._reservation.settle(len(self.output_ids))
        by_worker: dict[str, tuple[WorkerHandle, list[str]]] = {}
        for engine_id, worker in self._open.items():
            by_worker.setdefault(worker.worker_id, (worker, []))[1].append(engine_id)
        self._open.clear()
        for worker, engine_ids in by_worker.values():
            self.s.spawn(abort(worker, engine_ids))


def _cancelled_by_stall(worker: WorkerHandle, num_stalls: int, e: BaseException) -> bool:
    """The call was cancelled by the pool because `worker` stalled (WorkerPool.mark_stalled), not because this
    request was cancelled."""
    task = asyncio.current_task()
    return (isinstance(e, asyncio.CancelledError) and worker.stalled_since(num_stalls)
            and (task is None or not task.cancelling()))


def _worker_gone(e: BaseException) -> bool:
    """The call failed because the worker went away (or its channel was closed), not because of the request."""
    if isinstance(e, grpc.aio.AioRpcError):
        return e.code() in WORKER_GONE
    return isinstance(e, grpc.aio.UsageError)


async def abort(worker: WorkerHandle, engine_ids: list[str]) -> None:
    try:
        await worker.stub.Abort(worker_pb2.AbortRequest(request_ids=engine_ids), timeout=ABORT_TIMEOUT_S)
    except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
        # A worker that is gone holds nothing; one that is alive frees the KV when its lease expires.
        log.debug("abort %s on worker %s: %s", engine_ids, worker.worker_id, e)
