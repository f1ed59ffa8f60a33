"""The autoscaler's policy: from one load sample and what each pool has, the replicas each pool should have.

No servers, no clocks, no Kubernetes: `Planner.plan(now_s, pools, sample)` is a pure step over its own memory
(recommendation history, cooldowns, the last replicas it set), so recorded metric series drive it in tests.

How a pool's desired size is computed (the Kubernetes HPA's rule, desired = ceil(ready * current / target),
kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/#algorithm-details, over several signals, the
largest wins as in the HPA):
  prefill ("both" pools take both sets):
    ttft        TTFT p90 / (ttft_slo_s * slo_headroom)
    queue       the time the queued prompt tokens take at the pool's measured prefill rate / (ttft_slo_s *
                queue_share); the measured rate: the most prompt tokens/s a replica computed while work waited
    throughput  prompt tokens/s computed / (that rate * ready * target_prefill_utilization)
  decode:
    tpot        TPOT p90 / (tpot_slo_s * slo_headroom)
    kv_cache    KV cache usage / target_kv_cache_usage
  trend         the arrival rate predicted `forecast_horizon_s` ahead (least squares over `trend_window_s`) over the
            current one: a rising rate scales up before the SLO is missed (Dynamo's SLA planner predicts load too).
Then, in this order:
  - cold start: latency signals count only from `min_latency_samples` requests, and neither they nor the queue
    count within `warmup_s` of a replica becoming ready (its first answers carry start-up costs: Dynamo #12430 over-scaled on them); replicas
    still starting count as capacity already asked for, so a scale-up never repeats while they come up;
  - hysteresis: within `tolerance` of the target nothing grows; scale-down needs every latency signal within its
    target and the load-proportional ones (queue, throughput, kv_cache: latency under its SLO does not say how
    many replicas fewer would do) under `scale_down_utilization`, and takes the largest recommendation of the
    last `scale_down_stabilization_s`;
  - cooldowns: `scale_up_cooldown_s` between scale-ups of a pool, `scale_down_cooldown_s` after any change to it;
  - steps: a scale-up at most doubles the pool (and adds at least one);
  - min/max per pool;
  - the GPU budget: the sum over pools of max(current, desired) replicas (draining ones included: their GPUs are
    not free yet) times GPUs per replica never exceeds `gpu_budget`, also during a rebalance (Dynamo #12428):
    a pool that must shrink does so at once; one that grows gets what is free, the neediest first;
  - manual overrides: when a pool's replicas differ from what the planner last set, someone changed them by hand
    (Dynamo #4420): the planner adopts that size and leaves the pool alone for `manual_override_hold_s`.
Scale-down is never blocked by replicas still pending (Dynamo #14251): the actuator removes pending ones first.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from cluster.pools import PoolReplicas

# Why a pool's size was (or was not) changed, as `tandem_autoscaler_decisions_total{reason}` counts them.
REASONS = ("ttft", "queue", "throughput", "tpot", "kv_cache", "trend", "idle", "hold", "starting", "cooldown", "min_replicas",
           "max_replicas", "gpu_budget", "manual_override", "no_metrics")
# Signals that scale with 1/replicas, so that ceil(ready * signal) replicas bring them to 1.
_PROPORTIONAL = ("queue", "throughput", "kv_cache")


@dataclass(frozen=True)
class PoolLimits:
    """One pool's bounds. gpus_per_replica: GPUs one worker takes (its tensor-parallel size on GPU, 0 on CPU)."""
    min_replicas: int = 1
    max_replicas: int = 4
    gpus_per_replica: int = 0

    def __post_init__(self):
        if self.min_replicas < 0:
            raise ValueError(f"min_replicas: must be >= 0, got {self.min_replicas}")
        if self.max_replicas < max(self.min_replicas, 1):
            raise ValueError(f"max_replicas: must be >= min_replicas ({self.min_replicas}) and >= 1, "
                             f"got {self.max_replicas}")
        if self.gpus_per_replica < 0:
            raise ValueError(f"gpus_per_replica: must be >= 0, got {self.gpus_per_replica}")


@dataclass(frozen=True)
class PlannerConfig:
    """SLOs and the policy's knobs. Times in seconds; utilizations are fractions of the target (1.0 = at it)."""
    pools: dict[str, PoolLimits] = field(default_factory=lambda: {"prefill": PoolLimits(), "decode": PoolLimits()})
    ttft_slo_s: float = 2.0  # p90 time to first token
    tpot_slo_s: float = 0.1  # p90 time per output token
    slo_headroom: float = 0.8  # aim the p90 at 80% of its SLO
    queue_share: float = 0.5  # the part of the TTFT SLO queueing may take
    target_kv_cache_usage: float = 0.8
    target_prefill_utilization: float = 0.8  # of the most prompt tokens/s a replica was seen to compute
    # One replica's prefill capacity, prompt tokens/s, measured beforehand (bench_engine's prefill figure; Dynamo's
    # planner profiles it the same way); None: learned from the load. A larger rate seen under load replaces it.
    prefill_tokens_per_s_per_replica: float | None = None
    saturation_backlog_s: float = 5.0  # a backlog this many seconds of work long means the pool is saturated
    gpu_budget: int | None = None  # None: no limit
    tolerance: float = 0.1  # the HPA's default
    scale_down_utilization: float = 0.5
    scale_down_stabilization_s: float = 300.0  # the HPA's default window
    scale_up_cooldown_s: float = 30.0
    scale_down_cooldown_s: float = 120.0
    warmup_s: float = 60.0
    min_latency_samples: int = 10
    trend_window_s: float = 120.0
    forecast_horizon_s: float = 60.0  # about a worker's start-up: what the trend must look ahead
    max_trend_factor: float = 2.0
    manual_override_hold_s: float = 600.0

    def __post_init__(self):
        for role in self.pools:
            if role not in ("prefill", "decode", "both"):
                raise ValueError(f"pools: roles are prefill, decode and both, got {role!r}")
        for name in ("ttft_slo_s", "tpot_slo_s", "slo_headroom", "queue_share", "target_kv_cache_usage",
                     "target_prefill_utilization", "saturation_backlog_s"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name}: must be > 0 and finite, got {getattr(self, name)}")
        for name in ("tolerance", "scale_down_utilization", "scale_down_stabilization_s", "scale_up_cooldown_s",
                     "scale_down_cooldown_s", "warmup_s", "trend_window_s", "forecast_horizon_s",
                     "manual_override_hold_s"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name}: must be >= 0 and finite, got {getattr(self, name)}")
        if not 1 <= self.max_trend_factor < math.inf:
            raise ValueError(f"max_trend_factor: must be >= 1 and finite, got {self.max_trend_factor}")
        rate = self.prefill_tokens_per_s_per_replica
        if rate is not None and not 0 < rate < math.inf:
            raise ValueError(f"prefill_tokens_per_s_per_replica: must be > 0 and finite, got {rate}")
        if self.gpu_budget is not None and self.gpu_budget < 0:
            raise ValueError(f"gpu_budget: must be >= 0, got {self.gpu_budget}")
        if self.gpu_budget is not None:
            floor = sum(p.min_replicas * p.gpus_per_replica for p in self.pools.values())
            if floor > self.gpu_budget:
                raise ValueError(f"gpu_budget: the pools' min_replicas need {floor} GPUs, got {self.gpu_budget}")


@dataclass(frozen=True)
class PoolLoad:
    """One pool's load over the last collection interval (MetricsCollector builds it; tests write it)."""
    request_rate: float = 0.0  # requests/s that reached the pool
    ttft_p90_s: float | None = None  # None: no request finished its first token in the window
    tpot_p90_s: float | None = None
    latency_samples: int = 0  # requests behind those percentiles
    queued_prompt_tokens: int = 0  # prompt tokens waiting to be computed (workers' queues + the routers')
    prompt_tokens_per_s: float = 0.0  # prompt tokens the pool computed per second
    kv_cache_usage: float = 0.0  # mean over the pool's ready workers, 0-1


@dataclass(frozen=True)
class Sample:
    t_s: float
    pools: dict[str, PoolLoad]


@dataclass(frozen=True)
class Decision:
    role: str
    current: int  # replicas the pool is sized to now (ready + starting)
    desired: int
    reason: str  # one of REASONS
    utilization: float | None = None  # the largest signal (1.0 = at target); None: no signal

    @property
    def changes(self) -> bool:
        return self.desired != self.current


@dataclass
class _PoolMemory:
    last_set: int | None = None
    last_scale_up_s: float = -math.inf
    last_change_s: float = -math.inf
    override_until_s: float = -math.inf
    last_ready: int | None = None  # None: not observed yet (replicas up before the autoscaler are not new)
    ready_rose_s: float = -math.inf
    recommendations: deque = field(default_factory=deque)  # (t_s, replicas)
    rates: deque = field(default_factory=deque)  # (t_s, request_rate)
    prefill_rate_per_replica: float = 0.0  # the most prompt tokens/s one replica was seen to compute


class Planner:
    """Stateful over a series of `plan` calls; one per autoscaler."""

    def __init__(self, config: PlannerConfig):
        self.config = config
        self._mem = {role: _PoolMemory(prefill_rate_per_replica=config.prefill_tokens_per_s_per_replica or 0.0)
                     for role in config.pools}

    def plan(self, now_s: float, pools: dict[str, PoolReplicas], sample: Sample | None) -> dict[str, Decision]:
        """Desired replicas per pool. pools: what each pool has now (PoolReplicas.desired is its current size:
        the RayCluster's replicas, the controller's target). Raises ValueError for a pool the config lacks."""
        for role in pools:
            if role not in self.config.pools:
                raise ValueError(f"pools: {role!r} has no limits in the planner's config "
                                 f"(configured: {', '.join(self.config.pools)})")
        wanted = {}
        for role, have in pools.items():
            load = sample.pools.get(role) if sample is not None else None
            wanted[role] = self._plan_pool(now_s, role, have, load)
        decisions = self._apply_gpu_budget(pools, wanted)
        for role, d in decisions.items():
            mem = self._mem[role]
            if d.desired > d.current:
                mem.last_scale_up_s = now_s
            if d.changes:
                mem.last_change_s = now_s
            mem.last_set = d.desired
        return decisions

    def not_applied(self, role: str, replicas: int) -> None:
        """The actuator could not apply the last decision for `role`, which stays at `replicas`: not a manual
        override on the next call."""
        self._mem[role].last_set = replicas

    # --- one pool -------------------------------------------------------------------------------------

    def _plan_pool(self, now_s: float, role: str, have: PoolReplicas, load: PoolLoad | None) -> Decision:
        cfg, limits, mem = self.config, self.config.pools[role], self._mem[role]
        current = have.desired
        if mem.last_ready is not None and have.ready > mem.last_ready:
            mem.ready_rose_s = now_s
        mem.last_ready = have.ready
        if load is not None:
            self._remember(now_s, mem, load, have)

        if mem.last_set is not None and current != mem.last_set:
            mem.override_until_s = now_s + cfg.manual_override_hold_s
        # The bounds hold even against a manual change: a drained last worker must not leave a pool empty for the
        # override's hold (found by a new-user trial: `tandem drain` of the only decode worker).
        if current < limits.min_replicas:
            return Decision(role, current, limits.min_replicas, "min_replicas")
        if current > limits.max_replicas:
            return Decision(role, current, limits.max_replicas, "max_replicas")
        if now_s < mem.override_until_s:
            return Decision(role, current, current, "manual_override")
        if load is None:
            return Decision(role, current, current, "no_metrics")

        signals = self._signals(now_s, role, have, load, mem)
        if not signals:
            return Decision(role, current, current, "no_metrics")
        trend = self._trend_factor(now_s, mem, load)
        reason, now_util = max(signals.items(), key=lambda kv: kv[1])
        utilization = now_util * trend
        if now_util <= 1 + cfg.tolerance < utilization:
            reason = "trend"  # within the targets now, not in forecast_horizon_s
        # Only load-proportional signals say how many replicas fewer would do: latency below its SLO does not
        # shrink with fewer replicas until they saturate.
        proportional = [v for k, v in signals.items() if k in _PROPORTIONAL]
        size_util = max(proportional) * trend if proportional else None
        base = max(have.ready, 1)
        if size_util is not None:
            mem.recommendations.append((now_s, math.ceil(base * size_util - 1e-9)))
        while mem.recommendations and mem.recommendations[0][0] < now_s - cfg.scale_down_stabilization_s:
            mem.recommendations.popleft()

        if utilization > 1 + cfg.tolerance:
            raw = math.ceil(base * utilization - 1e-9)
            if raw <= current:  # the replicas asked for earlier cover it once they are up
                return Decision(role, current, current, "starting" if have.starting else "hold", utilization)
            if have.ready == 0:
                return Decision(role, current, current, "starting", utilization)
            if now_s - mem.last_scale_up_s < cfg.scale_up_cooldown_s:
                return Decision(role, current, current, "cooldown", utilization)
            if current >= limits.max_replicas:
                return Decision(role, current, current, "max_replicas", utilization)
            desired = min(raw, max(2 * current, 1), limits.max_replicas)
            return Decision(role, current, desired, reason, utilization)

        latency_ok = all(v <= 1 for k, v in signals.items() if k not in _PROPORTIONAL)
        if (latency_ok and size_util is not None and size_util < cfg.scale_down_utilization
                and current > limits.min_replicas and mem.recommendations):
            if now_s - mem.last_change_s < cfg.scale_down_cooldown_s:
                return Decision(role, current, current, "cooldown", utilization)
            desired = max(max(r for _, r in mem.recommendations), limits.min_replicas)
            if desired < current:
                return Decision(role, current, desired, "idle", utilization)
        return Decision(role, current, current, "hold", utilization)

    def _remember(self, now_s: float, mem: _PoolMemory, load: PoolLoad, have: PoolReplicas) -> None:
        mem.rates.append((now_s, load.request_rate))
        while mem.rates and mem.rates[0][0] < now_s - self.config.trend_window_s:
            mem.rates.popleft()
        # A pool computes at its capacity only while work keeps waiting: a backlog of at least
        # `saturation_backlog_s` of what it computed (a request that just arrived into an idle interval is no
        # measure: recorded on a real ramp, that read 41 tokens/s and asked for a second prefill worker at
        # 0.4 req/s). Then its rate per replica measures its capacity.
        saturated = load.queued_prompt_tokens >= load.prompt_tokens_per_s * self.config.saturation_backlog_s
        if saturated and load.prompt_tokens_per_s > 0 and have.ready > 0:
            mem.prefill_rate_per_replica = max(mem.prefill_rate_per_replica, load.prompt_tokens_per_s / have.ready)

    def _signals(self, now_s: float, role: str, have: PoolReplicas, load: PoolLoad,
                 mem: _PoolMemory) -> dict[str, float]:
        cfg = self.config
        # A replica that just became ready answers its first requests slowly and starts behind the backlog that
        # built up while it started: neither says what the pool needs once warm.
        warm = have.ready > 0 and now_s - mem.ready_rose_s >= cfg.warmup_s
        latency_ok = warm and load.latency_samples >= cfg.min_latency_samples
        signals = {}
        if role in ("prefill", "both"):
            if latency_ok and load.ttft_p90_s is not None:
                signals["ttft"] = load.ttft_p90_s / (cfg.ttft_slo_s * cfg.slo_headroom)
            if mem.prefill_rate_per_replica > 0 and have.ready > 0:
                capacity = mem.prefill_rate_per_replica * have.ready  # prompt tokens/s
                if warm:
                    signals["queue"] = load.queued_prompt_tokens / capacity / (cfg.ttft_slo_s * cfg.queue_share)
                signals["throughput"] = load.prompt_tokens_per_s / capacity / cfg.target_prefill_utilization
            elif have.ready > 0 and load.prompt_tokens_per_s == 0 and load.queued_prompt_tokens == 0:
                signals["throughput"] = 0.0  # nothing to compute: idle whatever the capacity
        if role in ("decode", "both"):
            if latency_ok and load.tpot_p90_s is not None:
                signals["tpot"] = load.tpot_p90_s / (cfg.tpot_slo_s * cfg.slo_headroom)
            if have.ready > 0:
                signals["kv_cache"] = load.kv_cache_usage / cfg.target_kv_cache_usage
        return signals

    def _trend_factor(self, now_s: float, mem: _PoolMemory, load: PoolLoad) -> float:
        """predicted rate / current rate, from a least-squares line over the window; 1.0 without a rise."""
        cfg = self.config
        if len(mem.rates) < 3 or load.request_rate <= 0:
            return 1.0
        ts = [t for t, _ in mem.rates]
        rs = [r for _, r in mem.rates]
        t_mean, r_mean = sum(ts) / len(ts), sum(rs) / len(rs)
        var = sum((t - t_mean) ** 2 for t in ts)
        if var <= 0:
            return 1.0
        slope = sum((t - t_mean) * (r - r_mean) for t, r in zip(ts, rs)) / var
        predicted = r_mean + slope * (now_s + cfg.forecast_horizon_s - t_mean)
        return min(max(predicted / load.request_rate, 1.0), cfg.max_trend_factor)

    # --- across pools ---------------------------------------------------------------------------------

    def _apply_gpu_budget(self, pools: dict[str, PoolReplicas], wanted: dict[str, Decision]) -> dict[str, Decision]:
        budget = self.config.gpu_budget
        if budget is None:
            return wanted
        gpus = {role: self.config.pools[role].gpus_per_replica for role in pools}
        # GPUs held once the shrinking pools have shrunk: draining replicas hold theirs until they are gone.
        held = {role: (min(wanted[role].desired, pools[role].desired) + pools[role].draining) * gpus[role]
                for role in pools}
        free = budget - sum(held.values())
        out = dict(wanted)
        growing = [role for role in pools if wanted[role].desired > pools[role].desired and gpus[role]]
        growing.sort(key=lambda role: -(wanted[role].utilization or 0.0))
        for role in growing:
            d = wanted[role]
            affordable = max(free, 0) // gpus[role]
            grant = min(d.desired - d.current, affordable)
            free -= grant * gpus[role]
            if grant < d.desired - d.current:
                out[role] = Decision(role, d.current, d.current + grant, "gpu_budget", d.utilization)
        return out
