"""The autoscaler's samples from router scrapes: the Prometheus text comes from the router's own instruments
(router/metrics.py through tandem.telemetry), so a renamed metric breaks this test, not production."""
from __future__ import annotations

import pytest

from cluster.autoscaler.metrics import RouterScrape, SampleBuilder, WorkerLoad, quantile
from router.metrics import RouterMetrics, genai_attributes
from tandem.telemetry import Telemetry


class FakeRouterTraffic:
    """A router process's metrics, recorded the way router/request.py records them."""

    def __init__(self):
        self.telemetry = Telemetry("tandem-router-test")
        self.m = self.telemetry.instruments(RouterMetrics)
        self.attrs = genai_attributes("chat", "smollm2")

    def finish(self, n: int, ttft_s: float, tpot_s: float, prompt_len: int) -> None:
        for _ in range(n):
            self.m.inflight_requests.add(1, self.attrs)
            self.m.time_to_first_token.record(ttft_s, self.attrs)
            self.m.time_per_output_token.record(tpot_s, self.attrs)
            self.m.token_usage.record(prompt_len, {**self.attrs, "gen_ai.token.type": "input"})
            self.m.token_usage.record(16, {**self.attrs, "gen_ai.token.type": "output"})
            self.m.inflight_requests.add(-1, self.attrs)
            self.m.requests.add(1, {**self.attrs, "status": "success", "finish_reason": "stop"})

    def start(self, n: int) -> None:
        self.m.inflight_requests.add(n, self.attrs)

    def scrape(self, name: str, queued: dict[str, int] | None = None) -> RouterScrape:
        return RouterScrape(name, self.telemetry.metrics_text()[0].decode(), queued or {})


@pytest.fixture
def routers():
    rs = [FakeRouterTraffic(), FakeRouterTraffic()]
    yield rs
    for r in rs:
        r.telemetry.shutdown()


def workers(prompt_tokens: tuple[int, int], waiting_tokens: int = 0, kv: tuple[float, float] = (0.2, 0.6)):
    return [WorkerLoad("prefill-a", "prefill", waiting_tokens, 0.1, prompt_tokens[0]),
            WorkerLoad("prefill-b", "prefill", 0, 0.1, prompt_tokens[1]),
            WorkerLoad("decode-a", "decode", 0, kv[0], 0),
            WorkerLoad("decode-b", "decode", 0, kv[1], 0)]


def test_a_sample_sums_routers_and_differences_counters(routers):
    a, b = routers
    builder = SampleBuilder()
    a.finish(5, ttft_s=0.3, tpot_s=0.04, prompt_len=500)  # before the baseline: not in the first sample
    without_b = [w for w in workers((10_000, 0)) if w.worker_id != "prefill-b"]  # prefill-b starts later
    assert builder.update(0.0, without_b, [a.scrape("a"), b.scrape("b")]) is None

    a.finish(30, ttft_s=0.3, tpot_s=0.04, prompt_len=1000)
    b.finish(10, ttft_s=3.0, tpot_s=0.2, prompt_len=1000)
    b.start(4)  # arrived, not finished
    sample = builder.update(10.0, workers((30_000, 20_000), waiting_tokens=3000),
                            [a.scrape("a", {"prefill": 2}), b.scrape("b")])
    prefill, decode = sample.pools["prefill"], sample.pools["decode"]
    assert prefill.request_rate == pytest.approx((40 + 4) / 10)
    assert prefill.latency_samples == 40 and decode.latency_samples == 40
    # 30 of 40 TTFTs at 0.3 s, 10 at 3 s: the p90 (rank 36) is inside the slow ones' bucket (2.5-5 s), as
    # Prometheus' histogram_quantile puts it: 2.5 + 2.5 * 6/10.
    assert prefill.ttft_p90_s == pytest.approx(4.0)
    assert 0.15 < decode.tpot_p90_s <= 0.2
    # Prompt tokens computed per second, per worker differences (prefill-b is new: from 0 would overcount).
    assert prefill.prompt_tokens_per_s == pytest.approx(20_000 / 10)
    # Workers' queued tokens + 2 router-queued requests at the interval's mean prompt length (1000).
    assert prefill.queued_prompt_tokens == 3000 + 2 * 1000
    assert decode.kv_cache_usage == pytest.approx(0.4)
    assert prefill.tpot_p90_s is None and decode.ttft_p90_s is None


def test_a_restarted_or_new_router_does_not_make_counters_jump(routers):
    a, b = routers
    builder = SampleBuilder()
    a.finish(100, ttft_s=0.3, tpot_s=0.04, prompt_len=100)
    builder.update(0.0, workers((0, 0)), [a.scrape("a")])
    b.finish(50, ttft_s=0.3, tpot_s=0.04, prompt_len=100)  # b's first scrape: its history is not this interval's
    fresh = FakeRouterTraffic()  # "a" restarted: its counters are back to zero
    try:
        fresh.finish(3, ttft_s=0.3, tpot_s=0.04, prompt_len=100)
        sample = builder.update(10.0, workers((0, 0)), [fresh.scrape("a"), b.scrape("b")])
    finally:
        fresh.telemetry.shutdown()
    assert sample.pools["prefill"].latency_samples == 0
    assert sample.pools["prefill"].request_rate == 0.0


def test_colocated_mode_has_one_pool_with_both_signals(routers):
    a, _ = routers
    builder = SampleBuilder(mode="colocated")
    both = [WorkerLoad("both-a", "both", 500, 0.5, 0)]
    builder.update(0.0, both, [a.scrape("a")])
    a.finish(20, ttft_s=0.3, tpot_s=0.04, prompt_len=100)
    sample = builder.update(5.0, [WorkerLoad("both-a", "both", 500, 0.5, 2000)], [a.scrape("a")])
    assert set(sample.pools) == {"both"}
    load = sample.pools["both"]
    assert load.ttft_p90_s is not None and load.tpot_p90_s is not None
    assert load.prompt_tokens_per_s == pytest.approx(400.0) and load.kv_cache_usage == 0.5


def test_quantile_matches_prometheus_histogram_quantile():
    buckets = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, float("inf"): 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.3)
    assert quantile(0.95, buckets) == pytest.approx(0.75)
    assert quantile(0.9, {0.1: 0.0, float("inf"): 0.0}) is None
    assert quantile(0.99, {1.0: 1.0, float("inf"): 10.0}) == 1.0  # in +Inf: the largest finite bound
