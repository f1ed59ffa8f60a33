"""The registry actuator (tandem autoscaler --actuator registry) against a real registry over gRPC, in front of
the stand-in controller of the registry's own tests; and the autoscaler loop driving it."""
from __future__ import annotations

import pytest

from cluster.autoscaler.loop import Autoscaler
from cluster.autoscaler.planner import Planner, PlannerConfig, PoolLimits
from cluster.autoscaler.registry import RegistryActuator
from cluster.pools import PoolReplicas
from cluster.registry import WorkerRegistry
from tests.cluster.test_registry_pools import FakeControl


@pytest.fixture
def served():
    control = FakeControl()
    reg = WorkerRegistry(control)
    actuator = RegistryActuator(reg.serve("127.0.0.1", 0))
    yield control, actuator
    actuator.close()
    reg.stop()


def test_observe_and_scale(served):
    control, actuator = served
    assert actuator.observe() == {"prefill": PoolReplicas(1, 1), "decode": PoolReplicas(2, 2)}
    actuator.scale("decode", 3)
    assert control.desired["decode"] == 3


def test_a_refused_size_is_a_value_error_with_the_controllers_words(served):
    _, actuator = served
    with pytest.raises(ValueError, match="role: must be one of prefill, decode, got 'both'"):
        actuator.scale("both", 1)


def test_the_loop_enforces_bounds_through_the_registry(served):
    control, actuator = served
    planner = Planner(PlannerConfig(pools={"prefill": PoolLimits(2, 4), "decode": PoolLimits(1, 1)}))
    decisions = Autoscaler(planner, actuator, lambda: ([], []), interval_s=1).step()
    assert (decisions["prefill"].reason, decisions["decode"].reason) == ("min_replicas", "max_replicas")
    assert control.desired == {"prefill": 2, "decode": 1}
