"""The semantic cache's instruments, in router/metrics.py's style. Prometheus names:
  tandem_router_semantic_cache_lookups_total{result}   hit | miss | guarded (a similar entry a guard turned down)
                                                       | skipped (no embedding in time: the request went on without)
  tandem_router_semantic_cache_stores_total{status}    stored | redis_unavailable (kept in this router only)
  tandem_router_semantic_cache_lookup_duration_seconds embedding plus index search, per opted-in request
  tandem_router_semantic_cache_entries                 entries this router's index holds
  tandem_router_semantic_cache_tenants                 tenants with entries there (no tenant label: with auth off any
                                                       X-Tenant-Id is a tenant, an unbounded label)
"""
from __future__ import annotations

from collections.abc import Callable

from opentelemetry.metrics import Meter, Observation

LOOKUP_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
RESULTS = ("hit", "miss", "guarded", "skipped")
STORE_STATUSES = ("stored", "redis_unavailable")


class SemanticCacheMetrics:
    """One set per router process (`Telemetry.instruments(SemanticCacheMetrics)`)."""

    def __init__(self, meter: Meter):
        self._meter = meter
        self.lookups = meter.create_counter(
            "tandem.router.semantic_cache.lookups", unit="{request}",
            description="Opted-in requests looked up in the semantic cache, by result")
        self.stores = meter.create_counter(
            "tandem.router.semantic_cache.stores", unit="{entry}",
            description="Answers written to the semantic cache, by status")
        self.lookup_duration = meter.create_histogram(
            "tandem.router.semantic_cache.lookup.duration", unit="s",
            description="Embedding and index search of one opted-in request",
            explicit_bucket_boundaries_advisory=LOOKUP_BUCKETS_S)
        # Zeros make the series exist before the first request (rate() and the dashboard see them), also on a
        # router whose cache is off (Router.start creates these instruments either way).
        for result in RESULTS:
            self.lookups.add(0, {"result": result})
        for status in STORE_STATUSES:
            self.stores.add(0, {"status": status})
        self._counts: Callable[[], tuple[int, int]] = lambda: (0, 0)
        meter.create_observable_gauge(
            "tandem.router.semantic_cache.entries", callbacks=[lambda options: [Observation(self._counts()[0])]],
            unit="{entry}", description="Entries in this router's semantic cache index")
        meter.create_observable_gauge(
            "tandem.router.semantic_cache.tenants", callbacks=[lambda options: [Observation(self._counts()[1])]],
            unit="{tenant}", description="Tenants with entries in this router's semantic cache index")

    def observe_entries(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Where the gauges read (entries, tenants): the running cache's index."""
        self._counts = counts
