"""The autoscaler's policy driven by metric series, with no servers: each test replays a series of samples (one
every 10 s, as the autoscaler collects them) against a simulated pool that becomes ready some time after it is
asked for, and checks the decisions a user would care about."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.autoscaler.planner import Planner, PlannerConfig, PoolLimits, PoolLoad, Sample
from cluster.pools import PoolReplicas
from cluster.autoscaler.series import load_series

DATA = Path(__file__).parent / "data"
TICK_S = 10.0


class SimPool:
    """A pool whose new replicas become ready `start_s` after they are asked for (or never: start_s=None, pods
    pending for lack of GPUs). Removing replicas takes the pending ones first, as the actuators do."""

    def __init__(self, ready: int, start_s: float | None = 30.0):
        self.ready = ready
        self.pending: list[float] = []  # when each starting replica was asked for
        self.start_s = start_s

    def advance(self, now_s: float) -> None:
        if self.start_s is None:
            return
        up = [t for t in self.pending if now_s - t >= self.start_s]
        self.pending = [t for t in self.pending if now_s - t < self.start_s]
        self.ready += len(up)

    def replicas(self) -> PoolReplicas:
        return PoolReplicas(desired=self.ready + len(self.pending), ready=self.ready, starting=len(self.pending))

    def scale(self, now_s: float, desired: int) -> None:
        have = self.ready + len(self.pending)
        if desired > have:
            self.pending += [now_s] * (desired - have)
        while desired < self.ready + len(self.pending) and self.pending:
            self.pending.pop()  # the newest pending first
        self.ready = min(self.ready, desired)


def replay(planner: Planner, pools: dict[str, SimPool], loads, t0_s: float = 0.0):
    """loads: one dict role -> PoolLoad per tick (a callable of (tick, pools) also works, for load that follows the
    replicas). Returns every tick's (t_s, decisions, sizes after applying them)."""
    history = []
    for i, load in enumerate(loads):
        now = t0_s + i * TICK_S
        for p in pools.values():
            p.advance(now)
        if callable(load):
            load = load(i, pools)
        decisions = planner.plan(now, {r: p.replicas() for r, p in pools.items()}, Sample(now, load))
        for role, d in decisions.items():
            if d.changes:
                pools[role].scale(now, d.desired)
        history.append((now, decisions, {r: p.replicas().desired for r, p in pools.items()}))
    return history


def prefill_load(rate: float, ready: int, capacity_tok_s: float = 2000.0, prompt_len: int = 1000) -> PoolLoad:
    """A prefill pool's load from its arrival rate: the queue grows by what exceeds the ready replicas' capacity,
    TTFT is the prompt's compute time plus the queue's; enough requests for a p90."""
    demand = rate * prompt_len
    served = min(demand, capacity_tok_s * ready)
    queued = int(max(demand - served, 0.0) * TICK_S)
    ttft = prompt_len / capacity_tok_s + (queued / (capacity_tok_s * ready) if ready else 30.0)
    return PoolLoad(request_rate=rate, ttft_p90_s=ttft, latency_samples=int(rate * TICK_S),
                    queued_prompt_tokens=queued, prompt_tokens_per_s=served)


def decode_load(rate: float, ready: int, kv_per_req_rate: float = 0.25) -> PoolLoad:
    usage = min(rate * kv_per_req_rate / max(ready, 1), 1.0)
    return PoolLoad(request_rate=rate, tpot_p90_s=0.05 + 0.1 * usage, latency_samples=int(rate * TICK_S),
                    kv_cache_usage=usage)


def config(**kw) -> PlannerConfig:
    pools = kw.pop("pools", {"prefill": PoolLimits(1, 8), "decode": PoolLimits(1, 8)})
    return PlannerConfig(pools=pools, ttft_slo_s=2.0, tpot_slo_s=0.2, warmup_s=30.0, scale_up_cooldown_s=20.0,
                         scale_down_cooldown_s=60.0, scale_down_stabilization_s=120.0, **kw)


def test_scale_up_on_a_ramp_and_back_down_after_it():
    """Arrivals ramp from 1 to 8 req/s over 5 minutes, stay, then stop: the prefill pool grows to what the load
    needs (each replica computes 2000 prompt tokens/s: 4 replicas for 8 req/s of 1000 tokens, plus headroom) and
    returns to its minimum after the load is gone, with no flapping in between."""
    planner = Planner(config())
    pools = {"prefill": SimPool(1), "decode": SimPool(1)}
    rates = [1 + 7 * min(i / 30, 1.0) for i in range(60)] + [0.0] * 40

    def tick(i, pools):
        return {"prefill": prefill_load(rates[i], pools["prefill"].ready),
                "decode": decode_load(rates[i], pools["decode"].ready)}

    history = replay(planner, pools, [tick] * len(rates))
    sizes = [sizes["prefill"] for _, _, sizes in history]
    peak = max(sizes)
    assert 4 <= peak <= 6, sizes
    assert sizes[59] >= 4  # still sized for the plateau at its end
    assert sizes[-1] == 1  # back to min_replicas once idle
    # Monotone up during the ramp, monotone down afterwards: no flapping.
    up, down = sizes[:60], sizes[60:]
    assert up == sorted(up) and down == sorted(down, reverse=True), sizes
    reasons = {d["prefill"].reason for _, d, _ in history if d["prefill"].changes}
    assert reasons & {"ttft", "queue", "trend"} and "idle" in reasons
    # The plateau's TTFT p90 is back under the SLO once the replicas are up.
    assert prefill_load(rates[59], pools_ready_at(history, 59)).ttft_p90_s < 2.0


def pools_ready_at(history, i) -> int:
    return history[i][2]["prefill"]


def test_the_trend_scales_up_before_the_slo_is_missed():
    """Arrivals rise steadily while two replicas (2000 prompt tokens/s each, measured beforehand) still serve them
    within the targets: the forecast adds a replica before a queue forms (reason `trend`); the same final rate,
    flat, changes nothing."""
    def run(rates):
        planner = Planner(config(prefill_tokens_per_s_per_replica=2000.0))
        pools = {"prefill": SimPool(2)}
        history = replay(planner, pools, [{"prefill": prefill_load(r, 2)} for r in rates])
        return [(d["prefill"].reason, s["prefill"], d["prefill"].utilization) for _, d, s in history]

    rising = run([1.0 + 0.2 * i for i in range(11)])  # 1 -> 3 req/s of 1000 tokens; 2 replicas serve 4
    first_up = next((reason, util) for reason, size, util in rising if size > 2)
    assert first_up[0] == "trend", rising
    assert all(load.queued_prompt_tokens == 0 for load in (prefill_load(1.0 + 0.2 * i, 2) for i in range(11)))
    flat = run([3.0] * 11)
    assert all(size == 2 for _, size, _ in flat), flat


def test_no_over_scaling_on_cold_start_samples():
    """The first answers of a fresh pool are slow (model load, empty caches: TTFT p90 40 s on a handful of
    requests) and a queue waits while the replicas start: the planner asks for nothing more while those replicas
    come up, and ignores latency from too few requests or from right after a replica became ready."""
    planner = Planner(config(prefill_tokens_per_s_per_replica=2000.0))
    pools = {"prefill": SimPool(0, start_s=60.0), "decode": SimPool(0, start_s=60.0)}
    pools["prefill"].scale(0.0, 2)
    pools["decode"].scale(0.0, 2)

    def tick(i, pools):
        ready = pools["prefill"].ready
        cold = PoolLoad(request_rate=0.5, ttft_p90_s=40.0, latency_samples=3, queued_prompt_tokens=20_000)
        if ready:
            # Just ready (at 60 s): a burst of slow first answers, enough requests for a p90, inside warmup_s.
            cold = replace(cold, latency_samples=50, prompt_tokens_per_s=500.0)
        return {"prefill": cold if i < 8 else prefill_load(0.5, ready), "decode": decode_load(0.5, 2)}

    history = replay(planner, pools, [tick] * 20)
    assert max(s["prefill"] for _, _, s in history) == 2
    assert max(s["decode"] for _, _, s in history) == 2
    starting = [d["prefill"].reason for _, d, _ in history[:6]]
    assert set(starting) <= {"starting", "no_metrics", "hold"}, starting


def test_a_queue_scales_up_even_without_latency_samples():
    """A long queue and no finished request yet (every one is still waiting): the queue signal, from the pool's
    prefill rate, is enough; a step at most doubles the pool."""
    planner = Planner(config(prefill_tokens_per_s_per_replica=2500.0))
    pools = {"prefill": SimPool(2)}
    busy = PoolLoad(request_rate=3.6, prompt_tokens_per_s=3600.0)  # 90% of the target utilization
    loads = [{"prefill": busy}] * 4 + [{"prefill": replace(busy, queued_prompt_tokens=40_000)}]
    history = replay(planner, pools, loads)
    assert [s["prefill"] for _, _, s in history[:4]] == [2] * 4
    last = history[-1][1]["prefill"]
    assert last.reason == "queue" and last.desired == 4


def test_scale_down_while_another_replica_is_pending():
    """The decode pool was scaled to 3 but its third pod waits for a GPU that never comes; load falls: the pool
    still scales down (Dynamo #14251 never did), and the pending replica is the one that goes."""
    planner = Planner(config())
    pools = {"decode": SimPool(2, start_s=None)}
    pools["decode"].scale(0.0, 3)
    loads = [{"decode": decode_load(0.2, 2)}] * 20
    history = replay(planner, pools, loads, t0_s=10.0)
    final = pools["decode"].replicas()
    assert final.desired == 1 and final.starting == 0, history[-1]
    first_down = next(d["decode"] for _, d, _ in history if d["decode"].changes)
    assert first_down.current == 3 and first_down.reason == "idle"


def test_the_gpu_budget_is_never_exceeded():
    """Both pools want to grow past an 8-GPU budget (TP 2 workers): the neediest pool gets the free GPUs first,
    and at no tick do the replicas (draining ones included) hold more than the budget."""
    limits = {"prefill": PoolLimits(1, 8, gpus_per_replica=2), "decode": PoolLimits(1, 8, gpus_per_replica=2)}
    planner = Planner(config(pools=limits, gpu_budget=8))
    pools = {"prefill": SimPool(1), "decode": SimPool(1)}

    def tick(i, pools):
        return {"prefill": prefill_load(6.0, pools["prefill"].ready),
                "decode": decode_load(12.0, pools["decode"].ready)}

    history = replay(planner, pools, [tick] * 30)
    for _, decisions, sizes in history:
        assert 2 * (sizes["prefill"] + sizes["decode"]) <= 8, sizes
    assert any(d[r].reason == "gpu_budget" for _, d, _ in history for r in d)
    assert history[-1][2] == {"prefill": 2, "decode": 2}  # 4 replicas of 2 GPUs: the whole budget, split


def test_a_rebalance_waits_for_draining_replicas_to_free_their_gpus():
    """At the budget, prefill idle and decode overloaded: prefill shrinks at once, but decode grows only when the
    drained replica's GPUs are free (PoolReplicas.draining counts against the budget)."""
    limits = {"prefill": PoolLimits(1, 4, gpus_per_replica=1), "decode": PoolLimits(1, 4, gpus_per_replica=1)}
    planner = Planner(config(pools=limits, gpu_budget=4, prefill_tokens_per_s_per_replica=2000.0))
    idle = PoolLoad(request_rate=0.1, ttft_p90_s=0.3, latency_samples=20, prompt_tokens_per_s=100.0)
    hot = PoolLoad(request_rate=8.0, tpot_p90_s=0.4, latency_samples=80, kv_cache_usage=0.95)
    # Past the warm-up and the stabilization window: idle for long enough.
    for i in range(20):
        now = i * TICK_S
        d = planner.plan(now, {"prefill": PoolReplicas(2, 2), "decode": PoolReplicas(2, 2)},
                         Sample(now, {"prefill": idle, "decode": replace(hot, kv_cache_usage=0.5, tpot_p90_s=0.1)}))
        assert not any(x.changes for x in d.values()) or d["prefill"].desired < 2
        if d["prefill"].changes:
            break
    assert d["prefill"].desired == 1 and not d["decode"].changes
    now += TICK_S
    # Prefill at 1 with one replica still draining; decode overloaded: no GPU is free yet.
    d = planner.plan(now, {"prefill": PoolReplicas(1, 1, draining=1), "decode": PoolReplicas(2, 2)},
                     Sample(now, {"prefill": idle, "decode": hot}))
    assert d["decode"].desired == 2 and d["decode"].reason == "gpu_budget"
    now += TICK_S * 3
    d = planner.plan(now, {"prefill": PoolReplicas(1, 1), "decode": PoolReplicas(2, 2)},
                     Sample(now, {"prefill": idle, "decode": hot}))
    assert d["decode"].desired == 3


def test_manual_overrides_are_respected():
    """Someone sets the decode pool to 5 by hand while load is low: the planner keeps 5 for
    manual_override_hold_s (no scale-down fight, Dynamo #4420), then resumes from 5."""
    planner = Planner(config(manual_override_hold_s=300.0))
    low = {"decode": decode_load(0.2, 2)}
    now = 0.0
    for _ in range(3):
        d = planner.plan(now, {"decode": PoolReplicas(2, 2)}, Sample(now, low))
        now += TICK_S
    held = []
    for _ in range(29):  # 290 s of the 300 s hold
        d = planner.plan(now, {"decode": PoolReplicas(5, 5)}, Sample(now, low))
        held.append(d["decode"])
        now += TICK_S
    assert all(x.desired == 5 and x.reason == "manual_override" for x in held)
    for _ in range(20):
        d = planner.plan(now, {"decode": PoolReplicas(d["decode"].desired, d["decode"].desired)}, Sample(now, low))
        now += TICK_S
    assert d["decode"].desired < 5


def test_min_and_max_replicas_bound_every_decision():
    planner = Planner(config(pools={"prefill": PoolLimits(2, 3)}))
    assert planner.plan(0.0, {"prefill": PoolReplicas(1, 1)}, None)["prefill"].desired == 2
    pools = {"prefill": SimPool(2)}
    history = replay(planner, pools, [{"prefill": prefill_load(50.0, 2)}] * 10, t0_s=10.0)
    assert max(s["prefill"] for _, _, s in history) == 3


def test_a_failed_actuation_is_not_taken_for_a_manual_override():
    planner = Planner(config(prefill_tokens_per_s_per_replica=2500.0))
    busy = PoolLoad(request_rate=3.6, prompt_tokens_per_s=3600.0)
    assert not planner.plan(0.0, {"prefill": PoolReplicas(2, 2)}, Sample(0.0, {"prefill": busy}))["prefill"].changes
    queued = {"prefill": replace(busy, queued_prompt_tokens=40_000)}
    assert planner.plan(10.0, {"prefill": PoolReplicas(2, 2)}, Sample(10.0, queued))["prefill"].desired == 4
    planner.not_applied("prefill", 2)  # the RayCluster patch failed
    d = planner.plan(40.0, {"prefill": PoolReplicas(2, 2)}, Sample(40.0, queued))["prefill"]
    assert d.reason == "queue" and d.desired == 4


@pytest.mark.parametrize("kwargs, field", [
    ({"pools": {"prefil": PoolLimits()}}, "pools"),
    ({"ttft_slo_s": 0}, "ttft_slo_s"),
    ({"gpu_budget": -1}, "gpu_budget"),
    ({"pools": {"decode": PoolLimits(2, 4, gpus_per_replica=4)}, "gpu_budget": 4}, "gpu_budget"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PlannerConfig(**kwargs)


def test_bad_limits_name_the_field():
    with pytest.raises(ValueError, match="max_replicas"):
        PoolLimits(3, 2)
    with pytest.raises(ValueError, match="min_replicas"):
        PoolLimits(-1, 2)


def test_a_recorded_ramp_scales_up_under_load_only():
    """A series recorded from a real cluster (1 prefill + 1 decode worker, the default model, 2 CPU cores) while
    `tandem loadtest ramp` raised arrivals from 0.25 to 3 req/s over 150 s, then nothing for 60 s
    (benchmarks/record_autoscaler_series.py, 5 s intervals). Replayed with the pools left as they were (every
    decision taken as not applied): no scale-up from the ramp's first, light minute (few requests, a momentary
    queue: the cold-start samples), both pools asked to grow once TTFT and TPOT pass their SLOs, and the idle tail
    asks for nothing more."""
    planner = Planner(PlannerConfig(pools={"prefill": PoolLimits(1, 4), "decode": PoolLimits(1, 4)}))
    ups: dict[str, list[tuple[float, str]]] = {"prefill": [], "decode": []}
    for t_s, pools, sample in load_series(DATA / "ramp_1p1d.jsonl"):
        for d in planner.plan(t_s, pools, sample).values():
            if d.changes:
                assert d.desired > d.current and d.desired <= 2  # one step from 1: at most doubled
                ups[d.role].append((t_s, d.reason))
                planner.not_applied(d.role, d.current)
    # The ramp starts at ~10 s; its first minute (<= 1 req/s) is served within the SLOs on one worker each.
    assert all(t > 70 for t, _ in ups["prefill"] + ups["decode"]), ups
    assert ups["prefill"] and ups["decode"], ups
    assert {r for _, r in ups["prefill"]} <= {"ttft", "queue", "throughput", "trend"}
    assert {r for _, r in ups["decode"]} <= {"tpot", "kv_cache", "trend"}
    # The load ends at ~160 s; the last requests finish by ~205 s. Nothing is asked for after that.
    assert all(t <= 210 for t, _ in ups["prefill"] + ups["decode"]), ups


def test_a_manual_change_below_the_minimum_is_brought_back_at_once():
    """`tandem drain` of the only decode worker shrinks its pool to 0: not a size to hold for the override's window
    (every request would fail); the minimum wins (found by a new-user trial)."""
    planner = Planner(config())
    low = {"decode": decode_load(0.2, 1)}
    planner.plan(0.0, {"decode": PoolReplicas(1, 1)}, Sample(0.0, low))
    d = planner.plan(10.0, {"decode": PoolReplicas(0, 0, draining=1)}, Sample(10.0, low))["decode"]
    assert (d.desired, d.reason) == (1, "min_replicas")


@pytest.mark.parametrize("name", ["warmup_s", "manual_override_hold_s", "scale_up_cooldown_s"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_times_must_be_finite_and_not_negative(name, value):
    with pytest.raises(ValueError, match=f"^{name}: must be >= 0 and finite"):
        PlannerConfig(**{name: value})
