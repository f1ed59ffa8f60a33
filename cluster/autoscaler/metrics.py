"""What the planner sees: one `Sample` per interval, from the routers.

Each router serves `tandem.v1.Cluster/GetStatus` (every worker's stats, its own queue per pool) on its gRPC port
and Prometheus text on its HTTP `/metrics` (the GenAI TTFT and TPOT histograms, request counters). Worker stats
are the same from any router, so they are read from the first that answers; what each router counts alone
(histograms, requests, queues) is summed over all of them. Rates and percentiles come from the difference between
two collections, per worker and per router, so workers and routers that come and go do not make counters jump.

`SampleBuilder` is the arithmetic (no I/O, tested with recorded scrapes); `RouterScraper` does the I/O.
"""
from __future__ import annotations

import asyncio
import logging
import math
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from cluster.autoscaler.planner import PoolLoad, Sample

log = logging.getLogger(__name__)

TTFT = "gen_ai_server_time_to_first_token_seconds"
TPOT = "gen_ai_server_time_per_output_token_seconds"
TOKEN_USAGE = "gen_ai_client_token_usage"
REQUESTS = "tandem_router_requests_total"
INFLIGHT = "tandem_router_inflight_requests"


@dataclass(frozen=True)
class WorkerLoad:
    """The part of tandem.v1.WorkerStats the planner uses (cumulative counters as the worker reports them)."""
    worker_id: str
    role: str
    num_waiting_tokens: int = 0
    kv_cache_usage: float = 0.0
    num_prompt_tokens: int = 0  # cumulative, cached tokens included


@dataclass(frozen=True)
class RouterScrape:
    """One router at one moment: its /metrics text and its queued requests per pool."""
    router: str
    metrics_text: str
    queued_requests: dict[str, int] = field(default_factory=dict)


@dataclass
class _Histogram:
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count
    count: float = 0.0
    total: float = 0.0


def parse_router_metrics(text: str) -> dict:
    """The series the planner needs from one router's Prometheus text: histograms summed over their labels
    (TTFT, TPOT, prompt-token usage) and request counters."""
    out = {TTFT: _Histogram(), TPOT: _Histogram(), "prompt_tokens": _Histogram(), "requests": 0.0, "inflight": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            for hist_name in (TTFT, TPOT):
                if name.startswith(hist_name):
                    _add(out[hist_name], name[len(hist_name):], labels, value)
            if name.startswith(TOKEN_USAGE) and labels.get("gen_ai_token_type") == "input":
                _add(out["prompt_tokens"], name[len(TOKEN_USAGE):], labels, value)
            if name == REQUESTS:
                out["requests"] += value
            elif name == INFLIGHT:
                out["inflight"] += value
    return out


def _add(h: _Histogram, suffix: str, labels: dict, value: float) -> None:
    if suffix == "_bucket":
        le = float(labels["le"])
        h.buckets[le] = h.buckets.get(le, 0.0) + value
    elif suffix == "_count":
        h.count += value
    elif suffix == "_sum":
        h.total += value


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative bucket counts (linear within a bucket; the +Inf bucket
    answers with the largest finite bound). None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                return prev_bound
            if c == prev_count:
                return b
            return prev_bound + (b - prev_bound) * (rank - prev_count) / (c - prev_count)
        prev_bound, prev_count = b, c
    return bounds[-1]


class SampleBuilder:
    """Turns successive collections into `Sample`s. The first collection only sets the baseline (None)."""

    def __init__(self, mode: str = "disaggregated"):
        self.pools = ("both",) if mode == "colocated" else ("prefill", "decode")
        self._last_t: float | None = None
        self._routers: dict[str, dict] = {}
        self._workers: dict[str, WorkerLoad] = {}

    def update(self, t_s: float, workers: list[WorkerLoad], routers: list[RouterScrape]) -> Sample | None:
        parsed = {r.router: parse_router_metrics(r.metrics_text) for r in routers}
        dt = None if self._last_t is None else t_s - self._last_t
        sample = None
        if dt is not None and dt > 0:
            sample = self._sample(t_s, dt, workers, routers, parsed)
        self._last_t = t_s
        self._routers = parsed
        self._workers = {w.worker_id: w for w in workers}
        return sample

    def _sample(self, t_s, dt, workers, routers, parsed) -> Sample:
        ttft, tpot, prompt = _Histogram(), _Histogram(), _Histogram()
        arrivals = 0.0
        for name, now in parsed.items():
            before = self._routers.get(name)
            if before is None:
                continue  # a new router: its counters start from its own start, not from this interval
            for hist, key in ((ttft, TTFT), (tpot, TPOT), (prompt, "prompt_tokens")):
                _delta_into(hist, now[key], before[key])
            # Arrivals = requests that ended + the change in those in flight.
            arrivals += max(now["requests"] - before["requests"], 0.0) + (now["inflight"] - before["inflight"])
        mean_prompt_len = prompt.total / prompt.count if prompt.count else 0.0
        rate = max(arrivals, 0.0) / dt
        loads = {}
        for pool in self.pools:
            mine = [w for w in workers if w.role == pool]
            computed = sum(max(w.num_prompt_tokens - self._workers[w.worker_id].num_prompt_tokens, 0)
                           for w in mine if w.worker_id in self._workers)
            queued_requests = sum(r.queued_requests.get(pool, 0) for r in routers)
            prefill_side, decode_side = pool in ("prefill", "both"), pool in ("decode", "both")
            loads[pool] = PoolLoad(
                request_rate=rate,
                ttft_p90_s=quantile(0.9, ttft.buckets) if prefill_side else None,
                tpot_p90_s=quantile(0.9, tpot.buckets) if decode_side else None,
                latency_samples=int(ttft.count if prefill_side else tpot.count),
                # The routers queue requests, not tokens: counted at the interval's mean prompt length.
                queued_prompt_tokens=(sum(w.num_waiting_tokens for w in mine)
                                      + int(queued_requests * mean_prompt_len)) if prefill_side else 0,
                prompt_tokens_per_s=computed / dt if prefill_side else 0.0,
                kv_cache_usage=sum(w.kv_cache_usage for w in mine) / len(mine) if mine else 0.0)
        return Sample(t_s, loads)


def _delta_into(acc: _Histogram, now: _Histogram, before: _Histogram) -> None:
    if now.count < before.count:
        return  # the router restarted: its counters went back to zero
    acc.count += now.count - before.count
    acc.total += now.total - before.total
    for le, c in now.buckets.items():
        acc.buckets[le] = acc.buckets.get(le, 0.0) + c - before.buckets.get(le, 0.0)


class RouterScraper:
    """Collects from routers: gRPC `Cluster/GetStatus` and HTTP `/metrics`, each call bounded by timeout_s.

    routers: a callable returning the routers to ask now, as (grpc address, metrics URL) pairs (a fixed list, or the
    router pods the Kubernetes API lists). A router that does not answer is skipped for this interval."""

    def __init__(self, routers, tls=None, api_key: str | None = None, timeout_s: float = 2.0):
        self._routers = routers
        self._tls = tls
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._timeout_s = timeout_s

    def collect(self) -> tuple[list[WorkerLoad], list[RouterScrape]]:
        from tandem import tls as tandem_tls
        from tandem.v1 import worker_pb2 as wpb
        from tandem.v1 import worker_pb2_grpc

        workers: list[WorkerLoad] | None = None
        scrapes = []
        for grpc_address, metrics_url in self._routers():
            try:
                with tandem_tls.channel(grpc_address, self._tls) as channel:
                    status = worker_pb2_grpc.ClusterStub(channel).GetStatus(
                        wpb.GetStatusRequest(), timeout=self._timeout_s, metadata=self._metadata)
                request = urllib.request.Request(metrics_url, headers=dict(self._metadata))
                with urllib.request.urlopen(request, timeout=self._timeout_s,
                                            context=self._ssl_context(metrics_url)) as resp:
                    text = resp.read().decode()
            except Exception as e:  # noqa: BLE001 - a router down or starting: the others still count
                log.warning("autoscaler: router %s did not answer (%s); skipped this interval", grpc_address, e)
                continue
            if workers is None:
                workers = [worker_load(w) for w in status.workers]
            scrapes.append(RouterScrape(grpc_address, text, {p.role: p.num_queued for p in status.pools}))
        return workers or [], scrapes

    def _ssl_context(self, url: str):
        return self._tls.client_ssl_context() if url.startswith("https:") and self._tls is not None else None


def worker_load(stats) -> WorkerLoad:
    """From a tandem.v1.WorkerStats."""
    return WorkerLoad(stats.info.worker_id, stats.info.role, stats.num_waiting_tokens, stats.kv_cache_usage,
                      stats.num_prompt_tokens)


def in_process_collector(router, loop: asyncio.AbstractEventLoop, timeout_s: float = 5.0):
    """collect() for a Router serving on `loop` in this process (`tandem up --autoscale`): what RouterScraper reads
    over the network, read on the router's own loop (its state is not thread-safe), without credentials."""
    async def snapshot():
        workers = [worker_load(w.stats) for w in router.pool.workers.values() if w.stats is not None]
        queued = {name: router.admission.num_queued(name) for name in router.config.pools}
        return workers, [RouterScrape("local", router.telemetry.metrics_text()[0].decode(), queued)]

    return lambda: asyncio.run_coroutine_threadsafe(snapshot(), loop).result(timeout_s)
