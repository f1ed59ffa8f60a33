"""The autoscaler's loop: every interval, observe the pools, collect a sample, plan, act.

Two actuators behind one interface (`Actuator`): `ControllerActuator` sizes the pools of a running `tandem up`
through its controller (worker actors added, or drained and removed, on Ray); `KubeRayActuator`
(cluster/autoscaler/kubernetes.py) patches the RayCluster's worker groups. Scale-downs are applied before
scale-ups in the same interval, so a rebalance under a GPU budget frees devices before it asks for them.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from cluster.autoscaler.metrics import RouterScrape, SampleBuilder, WorkerLoad
from cluster.autoscaler.planner import Decision, Planner
from cluster.pools import PoolReplicas

log = logging.getLogger(__name__)


class Actuator(Protocol):
    def observe(self) -> dict[str, PoolReplicas]:
        """What each pool has now; `desired` is the size it is set to."""

    def scale(self, role: str, replicas: int) -> None:
        """Set the pool to `replicas`; a scale-down drains the workers that leave. Raises on failure."""


class ControllerActuator:
    """The pools of an in-process `Controller` (tandem up --autoscale)."""

    def __init__(self, controller):
        self.controller = controller

    def observe(self) -> dict[str, PoolReplicas]:
        return self.controller.pool_status()

    def scale(self, role: str, replicas: int) -> None:
        self.controller.scale_pool(role, replicas)


class AutoscalerMetrics:
    """tandem_autoscaler_replicas{pool,state}, tandem_autoscaler_desired_replicas{pool},
    tandem_autoscaler_decisions_total{pool,reason} (reasons: planner.REASONS), tandem_autoscaler_errors_total."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.replicas = Gauge("tandem_autoscaler_replicas", "Workers per pool by state (desired, ready, starting, "
                              "draining) as the actuator reports them", ["pool", "state"], registry=self.registry)
        self.desired = Gauge("tandem_autoscaler_desired_replicas", "The size the planner chose per pool",
                             ["pool"], registry=self.registry)
        self.decisions = Counter("tandem_autoscaler_decisions", "Planner decisions per pool and reason",
                                 ["pool", "reason"], registry=self.registry)
        self.errors = Counter("tandem_autoscaler_errors", "Intervals that failed to observe, collect or act",
                              ["stage"], registry=self.registry)


class Autoscaler:
    """collect: a callable returning (workers, router scrapes) now (RouterScraper.collect, or a test's)."""

    def __init__(self, planner: Planner, actuator: Actuator,
                 collect: Callable[[], tuple[list[WorkerLoad], list[RouterScrape]]], interval_s: float = 15.0,
                 mode: str = "disaggregated", metrics: AutoscalerMetrics | None = None, dry_run: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        if not 0 < interval_s <= 3600:
            raise ValueError(f"interval_s: must be in (0, 3600], got {interval_s}")
        self.planner, self.actuator, self.collect = planner, actuator, collect
        self.interval_s, self.dry_run, self.clock = interval_s, dry_run, clock
        self.builder = SampleBuilder(mode)
        self.metrics = metrics or AutoscalerMetrics()
        self.last_decisions: dict[str, Decision] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> dict[str, Decision]:
        """One interval. Never raises: a failed stage is logged and counted, and the next interval tries again."""
        now = self.clock()
        try:
            pools = self.actuator.observe()
        except Exception as e:  # noqa: BLE001
            log.warning("autoscaler: cannot observe the pools: %s", e)
            self.metrics.errors.labels("observe").inc()
            return {}
        try:
            workers, routers = self.collect()
            sample = self.builder.update(now, workers, routers) if routers else None
        except Exception as e:  # noqa: BLE001 - plan without a sample: bounds and overrides still hold
            log.warning("autoscaler: cannot collect metrics: %s", e)
            self.metrics.errors.labels("collect").inc()
            sample = None
        for role, have in pools.items():
            for state in ("desired", "ready", "starting", "draining"):
                self.metrics.replicas.labels(role, state).set(getattr(have, state))
        decisions = self.planner.plan(now, pools, sample)
        for d in sorted(decisions.values(), key=lambda d: d.desired - d.current):  # scale-downs first
            self.metrics.decisions.labels(d.role, d.reason).inc()
            self.metrics.desired.labels(d.role).set(d.desired)
            if not d.changes:
                continue
            log.info("autoscaler: %s %d -> %d (%s, utilization %s)%s", d.role, d.current, d.desired, d.reason,
                     "n/a" if d.utilization is None else f"{d.utilization:.2f}", " [dry run]" if self.dry_run else "")
            if self.dry_run:
                self.planner.not_applied(d.role, d.current)
                continue
            try:
                self.actuator.scale(d.role, d.desired)
            except Exception as e:  # noqa: BLE001
                log.warning("autoscaler: scaling %s to %d failed: %s", d.role, d.desired, e)
                self.metrics.errors.labels("scale").inc()
                self.planner.not_applied(d.role, d.current)
        self.last_decisions = decisions
        return decisions

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tandem-autoscaler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.step()
            self._stop.wait(self.interval_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
