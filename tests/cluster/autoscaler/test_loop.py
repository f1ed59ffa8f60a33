"""The autoscaler's loop with a recording actuator: order of actions, failures, dry runs, options."""
from __future__ import annotations

import argparse

import pytest

from cluster.autoscaler.cli import add_planner_arguments, planner_config_from_args
from cluster.autoscaler.loop import Autoscaler
from cluster.autoscaler.planner import Planner, PlannerConfig, PoolLimits, PoolLoad, Sample
from cluster.pools import PoolReplicas


class RecordingActuator:
    def __init__(self, pools: dict[str, PoolReplicas], fail: bool = False):
        self.pools = dict(pools)
        self.calls: list[tuple[str, int]] = []
        self.fail = fail

    def observe(self):
        return dict(self.pools)

    def scale(self, role, replicas):
        self.calls.append((role, replicas))
        if self.fail:
            raise RuntimeError("the API server said no")
        self.pools[role] = PoolReplicas(replicas, ready=min(replicas, self.pools[role].ready),
                                        starting=max(replicas - self.pools[role].ready, 0))


class ScriptedPlanner(Planner):
    """The real planner, whose sample is given by the test (the loop's own builder needs two collections)."""

    def __init__(self, config, sample):
        super().__init__(config)
        self.sample = sample

    def plan(self, now_s, pools, sample):
        return super().plan(now_s, pools, self.sample)


def nothing():
    return [], []


def test_scale_downs_are_applied_before_scale_ups():
    limits = {"prefill": PoolLimits(1, 4, gpus_per_replica=1), "decode": PoolLimits(1, 4, gpus_per_replica=1)}
    config = PlannerConfig(pools=limits, gpu_budget=4, prefill_tokens_per_s_per_replica=1000.0,
                           scale_down_cooldown_s=0, scale_down_stabilization_s=0)
    sample = Sample(0.0, {"prefill": PoolLoad(request_rate=0.1, prompt_tokens_per_s=10.0),
                          "decode": PoolLoad(request_rate=0.1, kv_cache_usage=0.99)})
    actuator = RecordingActuator({"prefill": PoolReplicas(2, 2), "decode": PoolReplicas(1, 1)})
    autoscaler = Autoscaler(ScriptedPlanner(config, sample), actuator, nothing, interval_s=1, clock=lambda: 100.0)
    decisions = autoscaler.step()
    assert decisions["prefill"].desired == 1 and decisions["decode"].desired == 2
    assert actuator.calls == [("prefill", 1), ("decode", 2)]


def test_a_failed_scale_is_counted_and_retried_not_taken_for_a_manual_edit():
    config = PlannerConfig(pools={"prefill": PoolLimits(2, 4)})
    actuator = RecordingActuator({"prefill": PoolReplicas(1, 1)}, fail=True)
    t = iter(range(0, 1000, 10))
    autoscaler = Autoscaler(Planner(config), actuator, nothing, interval_s=1, clock=lambda: float(next(t)))
    assert autoscaler.step()["prefill"].reason == "min_replicas"
    second = autoscaler.step()["prefill"]
    assert second.reason == "min_replicas" and second.desired == 2
    assert actuator.calls == [("prefill", 2), ("prefill", 2)]
    assert autoscaler.metrics.errors.labels("scale")._value.get() == 2


def test_dry_run_changes_nothing():
    config = PlannerConfig(pools={"prefill": PoolLimits(2, 4)})
    actuator = RecordingActuator({"prefill": PoolReplicas(1, 1)})
    autoscaler = Autoscaler(Planner(config), actuator, nothing, interval_s=1, dry_run=True)
    assert autoscaler.step()["prefill"].desired == 2
    assert autoscaler.step()["prefill"].reason == "min_replicas"  # not a manual override either
    assert actuator.calls == []


def test_a_collect_failure_still_enforces_the_bounds():
    def broken():
        raise ConnectionError("router down")

    actuator = RecordingActuator({"decode": PoolReplicas(6, 6)})
    autoscaler = Autoscaler(Planner(PlannerConfig(pools={"decode": PoolLimits(1, 4)})), actuator, broken, 1)
    assert autoscaler.step()["decode"].reason == "max_replicas"
    assert actuator.calls == [("decode", 4)]
    assert autoscaler.metrics.errors.labels("collect")._value.get() == 1


def parse(argv):
    p = argparse.ArgumentParser()
    add_planner_arguments(p)
    return p.parse_args(argv)


def test_options_map_to_the_planner_and_bad_ones_name_the_flag():
    cfg = planner_config_from_args(parse(["--prefill-max", "6", "--gpu-budget", "8", "--gpus-per-worker", "2",
                                          "--ttft-slo-s", "1.5"]), limits={"decode": (2, 3)})
    assert cfg.pools["prefill"] == PoolLimits(1, 6, 2) and cfg.pools["decode"] == PoolLimits(2, 3, 2)
    assert cfg.ttft_slo_s == 1.5 and cfg.gpu_budget == 8
    colocated = planner_config_from_args(parse(["--decode-max", "3"]), mode="colocated")
    assert set(colocated.pools) == {"both"} and colocated.pools["both"].max_replicas == 3
    for argv, flag in ((["--prefill-min", "5", "--prefill-max", "2"], "--prefill-min/--prefill-max"),
                       (["--ttft-slo-s", "0"], "--ttft-slo-s"),
                       (["--gpu-budget", "1", "--gpus-per-worker", "1"], "--gpu-budget: the pools. min_replicas need 2 GPUs"),
                       (["--autoscale-interval-s", "0"], "--autoscale-interval-s"),
                       (["--autoscale-interval-s", "nan"], "--autoscale-interval-s"),  # busy-looped once
                       (["--autoscale-interval-s", "1e12"], "--autoscale-interval-s"),  # overflowed Event.wait
                       (["--warmup-s", "-1"], "--warmup-s"),
                       (["--prefill-tokens-per-s", "0"], "--prefill-tokens-per-s")):
        with pytest.raises(ValueError, match=flag):
            planner_config_from_args(parse(argv))
