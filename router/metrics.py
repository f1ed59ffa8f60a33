"""The router's instruments: the OpenTelemetry GenAI server metrics, plus the counters operators know from Dynamo's
frontend (requests by status, in-flight, queued per pool, migrations). GenerateCall records them.

Prometheus names (exporter: dots become underscores, the unit "s" adds _seconds, counters add _total):
  gen_ai_server_time_to_first_token_seconds, gen_ai_server_time_per_output_token_seconds,
  gen_ai_server_request_duration_seconds, gen_ai_client_token_usage (histograms, `_bucket`/`_sum`/`_count`);
  tandem_router_requests_total, tandem_router_inflight_requests, tandem_router_queued_requests,
  tandem_router_migrations_total, tandem_router_kv_load_failures_total{action} (KV hand-offs that failed, by what
  kv_load_failure_policy did: recompute, fail);
  with Redis (PrefixIndexMetrics): tandem_router_prefix_index_blocks, tandem_router_prefix_index_workers,
  tandem_router_prefix_index_stale_workers, tandem_router_kv_events_batches_applied_total,
  tandem_router_kv_events_batches_rejected_total{reason}, tandem_router_kv_events_snapshots_loaded_total,
  tandem_router_redis_up (1: reachable, 0: serving without the cache).
  cache-aware routing: tandem_router_routing_decisions_total{pool, reason} (reasons: router.policy.ROUTING_REASONS),
  tandem_router_prefix_cache_{prompt,cached,predicted}_tokens_total{pool}: per request whose prompt was computed,
  on the pool that computed it, its prompt tokens, the tokens the worker found cached (usage.cached_tokens) and
  those the prefix index predicted there (0 when routed without it). Hit rate = cached / prompt; prediction
  accuracy = predicted / cached.
"""
from __future__ import annotations

from opentelemetry.metrics import CallbackOptions, Meter, Observation

PROVIDER = "tandem"

# Bucket boundaries from the GenAI semantic conventions, so dashboards built for them work unchanged.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS_S = tuple(0.01 * 2 ** i for i in range(14))  # 0.01 ... 81.92
TOKEN_BUCKETS = tuple(4 ** i for i in range(14))  # 1 ... 67108864


class RouterMetrics:
    """One set per router process (`Telemetry.instruments(RouterMetrics)`)."""

    def __init__(self, meter: Meter):
        self.time_to_first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time from the request's arrival at the router to its first output token",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS_S)
        self.time_per_output_token = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Per request: (e2e - time to first token) / (output tokens - 1)",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS_S)
        self.request_duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s",
            description="Time from the request's arrival at the router to its last message",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Input (prompt) and output (completion) tokens per request, by gen_ai.token.type",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self.requests = meter.create_counter(
            "tandem.router.requests", unit="{request}",
            description="Requests ended, by status (success, error, cancelled) and finish_reason")
        self.inflight_requests = meter.create_up_down_counter(
            "tandem.router.inflight_requests", unit="{request}",
            description="Requests this router is serving now")
        self.queued_requests = meter.create_up_down_counter(
            "tandem.router.queued_requests", unit="{request}",
            description="Requests admitted and still waiting for their first token from the pool")
        self.migrations = meter.create_counter(
            "tandem.router.migrations", unit="{migration}",
            description="Requests moved to another decode worker after theirs failed mid-stream")
        self.kv_load_failures = meter.create_counter(
            "tandem.router.kv_load_failures", unit="{failure}",
            description="KV hand-offs that failed (the decode worker could not load the KV from the prefill worker), "
                        "by the action kv_load_failure_policy took: recompute, fail")
        self.routing_decisions = meter.create_counter(
            "tandem.router.routing_decisions", unit="{decision}",
            description="Workers chosen, by pool and reason (prefix_hit, load, hot_spot_guard, no_index)")
        self.prefix_cache_prompt_tokens = meter.create_counter(
            "tandem.router.prefix_cache.prompt_tokens", unit="{token}",
            description="Prompt tokens of requests whose prompt was computed, by the pool that computed it")
        self.prefix_cache_cached_tokens = meter.create_counter(
            "tandem.router.prefix_cache.cached_tokens", unit="{token}",
            description="Of those, the tokens the worker found in its prefix cache")
        self.prefix_cache_predicted_tokens = meter.create_counter(
            "tandem.router.prefix_cache.predicted_tokens", unit="{token}",
            description="Of those, the tokens the global prefix index said that worker held when it was chosen")


def genai_attributes(operation: str, model: str) -> dict[str, str]:
    """The attributes every GenAI metric point of a request carries."""
    return {"gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER, "gen_ai.request.model": model}


class PrefixIndexMetrics:
    """The global prefix index and its feed (router/cache/kv_events_follower.py), observed at each scrape."""

    def __init__(self, meter: Meter, follower):
        f = follower

        def gauge(name: str, value, unit: str, description: str) -> None:
            meter.create_observable_gauge(name, [lambda options: [Observation(value())]], unit=unit,
                                          description=description)

        def counter(name: str, value, unit: str, description: str) -> None:
            meter.create_observable_counter(name, [lambda options: [Observation(value())]], unit=unit,
                                            description=description)

        gauge("tandem.router.prefix_index.blocks", lambda: f.index.num_blocks(), "{block}",
              "KV blocks the global prefix index holds, over all workers")
        gauge("tandem.router.prefix_index.workers", lambda: len(f.index.workers), "{worker}",
              "Workers in the global prefix index")
        gauge("tandem.router.prefix_index.stale_workers", lambda: f.num_stale_workers, "{worker}",
              "Workers not scored until their next snapshot (a KV event batch was missed)")
        gauge("tandem.router.redis.up", lambda: int(f.redis_up), "1",
              "1 while Redis answers, 0 while the router serves without the cache")
        counter("tandem.router.kv_events.batches_applied", lambda: f.num_batches_applied, "{batch}",
                "KV event batches applied to the prefix index")
        counter("tandem.router.kv_events.snapshots_loaded", lambda: f.num_snapshots_loaded, "{snapshot}",
                "Worker snapshots loaded into the prefix index (bootstrap and resyncs)")

        def rejected(options: CallbackOptions):
            return [Observation(n, {"reason": reason}) for reason, n in f.num_rejected.items()]

        meter.create_observable_counter(
            "tandem.router.kv_events.batches_rejected", [rejected], unit="{batch}",
            description="KV event batches not applied on arrival, by reason (gap, unknown_epoch: held for the next "
                        "snapshot; unknown_worker, block_size, hash_version, malformed: refused)")
