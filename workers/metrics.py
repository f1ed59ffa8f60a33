"""A worker's Prometheus/OTLP metrics, under vLLM's names with a `tandem.` prefix.

Engine state is read from the engine thread's stats snapshot (`EngineLoop.snapshot`, taken after every step) by
observable instruments, so the step loop does no metrics work at all; KV transfer counters come from the
transport's own counters. Only per-transfer latencies are recorded as events (once per hand-off, never per token).

Prometheus names (every point labelled worker_id and worker_role):
  tandem_num_requests_running, tandem_num_requests_waiting, tandem_kv_cache_usage_perc (0-1),
  tandem_num_kv_held, tandem_prompt_tokens_total, tandem_generation_tokens_total,
  tandem_prefix_cache_queries_total, tandem_prefix_cache_hits_total (tokens), tandem_num_preemptions_total,
  tandem_request_success_total{finished_reason}, tandem_kv_transfer_bytes_total{direction=sent|received},
  tandem_kv_transfers_total{direction}, tandem_kv_transfer_leases_expired_total,
  tandem_kv_transport_info{kv_transport} (1: the transport this worker was configured with and started),
  per hand-off, decode side, labelled kv_transport, prefill_tp_size and decode_tp_size (SGLang's
  kv_transfer_latency_ms and kv_transfer_speed_gb_s, as histograms): tandem_kv_transfer_latency_seconds (pull until
  every shard is here), tandem_kv_transfer_size_bytes, tandem_kv_transfer_bandwidth_bytes_per_second;
  tandem_kv_transfer_stage_latency_seconds{kv_transport, prefill_tp_size} (prefill side: export + stage, on the
  engine thread);
  with Redis (KV events for the routers' prefix index): tandem_kv_events_published_batches_total,
  tandem_kv_events_published_events_total, tandem_kv_events_dropped_batches_total (a gap routers resync),
  tandem_kv_events_redis_errors_total, tandem_kv_events_pending_batches.
With the remote KV tier (kv_offload): tandem_kv_tier_lookups_total (prompts whose cached prefix fell short of them),
  tandem_kv_tier_requests_total{result=hit|miss|skipped|error} (skipped: the cost model chose to recompute),
  tandem_kv_tier_hit_tokens_total (prompt tokens inserted from the tier), tandem_kv_tier_blocks_total and
  tandem_kv_tier_bytes_total{direction=pulled|pushed|dropped}, tandem_kv_tier_checksum_failures_total,
  tandem_kv_tier_pull_latency_seconds, tandem_kv_tier_wait_seconds{result} (how long prompts waited on the tier).

Prefix cache counters count each request once, when the worker admits it to compute its prompt: not at every
scheduling attempt while it waits for blocks, nor again after a preemption. A disaggregated request is counted by
its prefill worker (the prompt it computed, and the part of it its own cache served); the decode worker that
imports its KV does not count it (its cached blocks only save copies). A request prefilled on the decode worker
(a short prompt, a failed KV pull, or a migration that recomputes prompt and output so far) is counted there. So
the sums over all workers give the cluster's hit rate, each prompt once per prefill.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

# KV pulls range from sub-millisecond (shm, short prompts) to seconds (long prompts over tcp).
KV_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A hand-off's KV: ~100 KiB (a short prompt, small model) to GiBs (long prompts, 70B-class models); x4 per bucket.
KV_SIZE_BUCKETS_BYTES = tuple(float(1 << n) for n in range(16, 33, 2))
# Per-transfer bandwidth: ~10 MB/s (tcp under load) to ~2 TB/s (cuda_ipc on an H200); x~3 per bucket.
KV_BANDWIDTH_BUCKETS_BYTES_S = (1e7, 3e7, 1e8, 3e8, 1e9, 3e9, 1e10, 3e10, 1e11, 3e11, 1e12, 3e12)

# (instrument name, snapshot field, unit, description)
_GAUGES = (
    ("tandem.num_requests_running", "num_running", "{request}", "Requests in the running batch"),
    ("tandem.num_requests_waiting", "num_waiting", "{request}", "Requests waiting to be scheduled"),
    ("tandem.kv_cache_usage_perc", "kv_cache_usage", "1", "Fraction of KV cache blocks held by requests (0-1)"),
    ("tandem.num_kv_held", "num_kv_held", "{request}", "Prefilled requests whose KV waits for a decode worker"),
)
_COUNTERS = (
    ("tandem.prompt_tokens", "num_prompt_tokens", "{token}", "Prompt tokens of requests prefilled here"),
    ("tandem.generation_tokens", "num_generation_tokens", "{token}", "Tokens sampled here"),
    ("tandem.prefix_cache_queries", "prefix_cache_queries", "{token}",
     "Prompt tokens of requests prefilled here, each request once at admission (imported KV not counted)"),
    ("tandem.prefix_cache_hits", "prefix_cache_hits", "{token}",
     "Of tandem_prefix_cache_queries, the tokens this worker's prefix cache served"),
    ("tandem.num_preemptions", "num_preemptions", "{preemption}", "Requests preempted (recomputed later)"),
)

# KV events published for the routers' prefix index (workers/kv_events/): (field, unit, description)
_KV_EVENT_COUNTERS = (
    ("published_batches", "{batch}", "KV event batches written to the Redis stream"),
    ("published_events", "{event}", "KV events (stored, removed, cleared) written to the Redis stream"),
    ("dropped_batches", "{batch}", "KV event batches dropped while Redis was unreachable (routers resync)"),
    ("redis_errors", "{error}", "Failed or refused Redis calls of the KV event publisher"),
)


class WorkerMetrics:
    """Registers a worker's instruments on `meter`. `snapshot()` returns the engine loop's latest stats dict,
    `transfer_stats()` the KV transport's counters, `leases_expired()` the expired lease count."""

    def __init__(self, meter: Meter, attributes: dict[str, str], snapshot: Callable[[], dict],
                 transfer_stats: Callable[[], dict[str, float]], leases_expired: Callable[[], int],
                 kv_events: Callable[[], dict[str, int]] | None = None, kv_transport: str | None = None):
        self.attributes = attributes
        self._meter = meter
        self._snapshot = snapshot
        self._transfer_stats = transfer_stats
        self._leases_expired = leases_expired
        for name, field, unit, description in _GAUGES:
            meter.create_observable_gauge(name, [self._observe(field)], unit=unit, description=description)
        for name, field, unit, description in _COUNTERS:
            meter.create_observable_counter(name, [self._observe(field)], unit=unit, description=description)
        meter.create_observable_counter(
            "tandem.request_success", [self._observe_finished], unit="{request}",
            description="Requests finished here, by finished_reason (stop, length, abort)")
        meter.create_observable_counter(
            "tandem.kv_transfer.bytes", [self._observe_transfers("bytes")], unit="By",
            description="KV bytes handed off: sent (acknowledged by a decode worker) and received")
        meter.create_observable_counter(
            "tandem.kv_transfers", [self._observe_transfers("transfers")], unit="{transfer}",
            description="KV hand-offs completed: sent and received")
        meter.create_observable_counter(
            "tandem.kv_transfer.leases_expired", [self._observe_leases_expired], unit="{lease}",
            description="Staged KV released because no decode worker fetched it within the lease")
        if kv_events is not None:
            self._register_kv_events(meter, kv_events)
        if kv_transport is not None:
            meter.create_observable_gauge(
                "tandem.kv_transport.info", [lambda options: [Observation(1, {**attributes,
                                                                                "kv_transport": kv_transport})]],
                unit="1", description="1, labelled with the KV transport this worker serves and pulls with")
        self.kv_transfer_latency = meter.create_histogram(
            "tandem.kv_transfer.latency", unit="s", explicit_bucket_boundaries_advisory=KV_LATENCY_BUCKETS_S,
            description="Decode side: time to pull a request's KV (every shard) from the prefill worker")
        self.kv_transfer_size = meter.create_histogram(
            "tandem.kv_transfer.size", unit="By", explicit_bucket_boundaries_advisory=KV_SIZE_BUCKETS_BYTES,
            description="Decode side: KV bytes of each hand-off, every shard together")
        self.kv_transfer_bandwidth = meter.create_histogram(
            "tandem.kv_transfer.bandwidth", unit="By/s", explicit_bucket_boundaries_advisory=KV_BANDWIDTH_BUCKETS_BYTES_S,
            description="Decode side: bytes / seconds of each hand-off's pull")
        self.kv_stage_latency = meter.create_histogram(
            "tandem.kv_transfer.stage_latency", unit="s", explicit_bucket_boundaries_advisory=KV_LATENCY_BUCKETS_S,
            description="Prefill side: time to export a request's KV and stage it on the transport")

    def _register_kv_events(self, meter: Meter, kv_events: Callable[[], dict[str, int]]) -> None:
        def observe(field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
            return lambda options: [Observation(kv_events()[field], self.attributes)]

        for field, unit, description in _KV_EVENT_COUNTERS:
            meter.create_observable_counter(f"tandem.kv_events.{field}", [observe(field)], unit=unit,
                                            description=description)
        meter.create_observable_gauge(
            "tandem.kv_events.pending_batches", [observe("pending_batches")], unit="{batch}",
            description="KV event batches waiting to be written to Redis")

    def add_kv_tier(self, tier) -> None:
        """Instruments of a RemoteKVTier (workers/kv_tier): its counters, read at each scrape, and its pull latency."""
        meter, stats = self._meter, tier.stats

        def counter(name, unit, description, points):
            def observe(options: CallbackOptions) -> Iterable[Observation]:
                return [Observation(stats[key], {**self.attributes, **labels}) for key, labels in points]
            meter.create_observable_counter(name, [observe], unit=unit, description=description)

        counter("tandem.kv_tier.lookups", "{request}", "Prompts whose locally cached prefix fell short of them",
                [("lookups", {})])
        counter("tandem.kv_tier.requests", "{request}", "Remote KV tier lookups by result",
                [("hits", {"result": "hit"}), ("misses", {"result": "miss"}), ("skipped", {"result": "skipped"}),
                 ("errors", {"result": "error"})])
        counter("tandem.kv_tier.hit_tokens", "{token}", "Prompt tokens whose KV was pulled from the tier",
                [("hit_tokens", {})])
        counter("tandem.kv_tier.blocks", "{block}", "KV blocks pulled, pushed, or dropped before a push",
                [("pulled_blocks", {"direction": "pulled"}), ("pushed_blocks", {"direction": "pushed"}),
                 ("push_dropped_blocks", {"direction": "dropped"})])
        counter("tandem.kv_tier.bytes", "By", "KV bytes pulled from and pushed to the tier",
                [("pulled_bytes", {"direction": "pulled"}), ("pushed_bytes", {"direction": "pushed"})])
        counter("tandem.kv_tier.checksum_failures", "{block}", "Tier values refused for a CRC32 mismatch",
                [("checksum_failures", {})])
        latency = meter.create_histogram(
            "tandem.kv_tier.pull_latency", unit="s", explicit_bucket_boundaries_advisory=KV_LATENCY_BUCKETS_S,
            description="Time to pull a prompt's blocks from the remote KV tier (lookup to last value checked)")
        tier.on_pull_latency = lambda seconds: latency.record(seconds, self.attributes)
        wait = meter.create_histogram(
            "tandem.kv_tier.wait", unit="s", explicit_bucket_boundaries_advisory=KV_LATENCY_BUCKETS_S,
            description="Time a prompt waited on the remote KV tier before its prefill, by result (hit: the whole "
                        "pull; miss, skipped, error: the lookup that gave nothing to use)")
        tier.on_wait = lambda seconds, result: wait.record(seconds, {**self.attributes, "result": result})

    def record_fetch(self, seconds: float, num_bytes: int, transport: str, prefill_tp_size: int,
                     decode_tp_size: int) -> None:
        """One hand-off pulled: `num_bytes` of every shard together in `seconds`."""
        attributes = {**self.attributes, "kv_transport": transport, "prefill_tp_size": prefill_tp_size,
                      "decode_tp_size": decode_tp_size}
        self.kv_transfer_latency.record(seconds, attributes)
        self.kv_transfer_size.record(num_bytes, attributes)
        if seconds > 0:
            self.kv_transfer_bandwidth.record(num_bytes / seconds, attributes)

    def record_stage(self, seconds: float, transport: str, prefill_tp_size: int) -> None:
        self.kv_stage_latency.record(seconds, {**self.attributes, "kv_transport": transport,
                                               "prefill_tp_size": prefill_tp_size})

    # --- callbacks (run at each scrape or OTLP export) ------------------------------------------------------

    def _observe(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(self._snapshot()[field], self.attributes)]
        return observe

    def _observe_finished(self, options: CallbackOptions) -> Iterable[Observation]:
        finished = self._snapshot()["num_requests_finished"]
        return [Observation(n, {**self.attributes, "finished_reason": reason}) for reason, n in finished.items()]

    def _observe_transfers(self, what: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            stats = self._transfer_stats()
            return [Observation(stats[f"{what}_{direction}"], {**self.attributes, "direction": direction})
                    for direction in ("sent", "received")]
        return observe

    def _observe_leases_expired(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self._leases_expired(), self.attributes)]
