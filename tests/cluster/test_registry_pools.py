"""The registry's pool RPCs (ScalePool, GetPools, DrainWorker) over real gRPC, in front of a stand-in controller;
the draining flag as routers read it; the follow-nodes sizing from Ray node records."""
from __future__ import annotations

import grpc
import pytest

from cluster.pools import PoolReplicas
from cluster.registry import WorkerRegistry
from tests.tls_certs import certs  # noqa: F401 - fixture
from tandem import tls
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc


class FakeControl:
    """Controller.scale_pool / pool_status / drain_workers' contract, recorded."""

    def __init__(self):
        self.desired = {"prefill": 1, "decode": 2}
        self.drained: list[tuple[str, str, bool]] = []

    def pool_status(self):
        return {role: PoolReplicas(n, ready=n) for role, n in self.desired.items()}

    def scale_pool(self, role, replicas):
        if role not in self.desired:
            raise ValueError(f"role: must be one of {', '.join(self.desired)}, got {role!r}")
        self.desired[role] = replicas

    def drain_workers(self, worker_id="", node_ip="", wait=False):
        if not worker_id and not node_ip:
            raise ValueError("target: set worker_id or node_ip")
        if worker_id not in ("", "decode-1"):
            raise LookupError(f"worker_id: no worker {worker_id!r}; workers: decode-1")
        self.drained.append((worker_id, node_ip, wait))
        return ["decode-1"]


@pytest.fixture
def registry():
    reg = WorkerRegistry(FakeControl())
    address = reg.serve("127.0.0.1", 0)
    channel = tls.channel(address, None)
    yield reg, worker_pb2_grpc.RegistryStub(channel)
    channel.close()
    reg.stop()


def _pools(resp: wpb.PoolsResponse) -> dict[str, tuple[int, int, int, int]]:
    return {p.role: (p.desired, p.ready, p.starting, p.draining) for p in resp.pools}


def test_scale_pool_and_get_pools(registry):
    reg, stub = registry
    assert _pools(stub.GetPools(wpb.GetPoolsRequest(), timeout=5)) == {"prefill": (1, 1, 0, 0), "decode": (2, 2, 0, 0)}
    resp = stub.ScalePool(wpb.ScalePoolRequest(role="decode", replicas=3), timeout=5)
    assert _pools(resp)["decode"] == (3, 3, 0, 0)
    assert reg.control.desired["decode"] == 3


@pytest.mark.parametrize("role, replicas, message", [
    ("both", 1, "role: must be one of prefill, decode, got 'both'"),
    ("", 1, "role: must be one of prefill, decode, got ''"),
    ("decode", 5000, "replicas: must be between 0 and 1024, got 5000"),
])
def test_scale_pool_refuses_bad_input_naming_the_field(registry, role, replicas, message):
    reg, stub = registry
    with pytest.raises(grpc.RpcError) as info:
        stub.ScalePool(wpb.ScalePoolRequest(role=role, replicas=replicas), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == message
    assert reg.control.desired == {"prefill": 1, "decode": 2}


def test_drain_worker(registry):
    reg, stub = registry
    resp = stub.DrainWorker(wpb.DrainWorkerRequest(node_ip="10.0.0.7", wait=True), timeout=5)
    assert list(resp.worker_ids) == ["decode-1"] and reg.control.drained == [("", "10.0.0.7", True)]
    with pytest.raises(grpc.RpcError) as info:
        stub.DrainWorker(wpb.DrainWorkerRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "worker_id or node_ip" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.DrainWorker(wpb.DrainWorkerRequest(worker_id="decode-9"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "worker_id: no worker 'decode-9'; workers: decode-1"


def test_without_a_controller_pool_rpcs_are_unimplemented():
    reg = WorkerRegistry()
    address = reg.serve("127.0.0.1", 0)
    try:
        with tls.channel(address, None) as channel:
            with pytest.raises(grpc.RpcError) as info:
                worker_pb2_grpc.RegistryStub(channel).GetPools(wpb.GetPoolsRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        reg.stop()


def test_list_workers_serves_the_draining_flag(registry):
    reg, stub = registry
    reg.add(wpb.WorkerInfo(worker_id="decode-1", role="decode", address="127.0.0.1:1"))
    reg.add(wpb.WorkerInfo(worker_id="decode-2", role="decode", address="127.0.0.1:2", draining=True))
    listed = {w.worker_id: w.draining for w in stub.ListWorkers(wpb.ListWorkersRequest(), timeout=5).workers}
    assert listed == {"decode-1": False, "decode-2": True}


def _node(ip, alive=True, **resources):
    return {"NodeID": ip.replace(".", ""), "NodeManagerAddress": ip, "Alive": alive, "Resources": {"CPU": 8.0, **resources}}


def test_follow_nodes_sizes_pools_from_alive_nodes_offering_their_resource():
    from cluster.controller import pool_sizes_from_nodes

    nodes = [_node("10.0.0.1"),  # the head: no pool resource
             _node("10.0.0.2", tandem_prefill=1.0), _node("10.0.0.3", tandem_decode=1.0),
             _node("10.0.0.4", tandem_decode=1.0), _node("10.0.0.5", alive=False, tandem_decode=1.0),
             _node("10.0.0.6", tandem_decode=2.0)]
    assert pool_sizes_from_nodes(nodes, ("prefill", "decode")) == {"prefill": 1, "decode": 4}
    # A node drained through DrainWorker (its pod is going away) no longer counts.
    assert pool_sizes_from_nodes(nodes, ("prefill", "decode"), {"10003"}) == {"prefill": 1, "decode": 3}
    assert pool_sizes_from_nodes([], ("both",)) == {"both": 0}


def test_tandem_drain_asks_the_registry_and_waits(registry):
    from tests.cluster.tandem_up import tandem

    reg, _ = registry
    out = tandem("drain", "--registry", reg.address, "--node-ip", "10.0.0.7", timeout=60)
    assert out.returncode == 0 and "drained decode-1" in out.stdout, out.stderr
    assert reg.control.drained == [("", "10.0.0.7", True)]
    # An unknown worker id (a typo) is an error; only --node-ip treats "no worker there" as done (a pod's preStop).
    out = tandem("drain", "--registry", reg.address, "--worker-id", "decode-9", "--no-wait", timeout=60)
    assert out.returncode == 1 and "NOT_FOUND: worker_id: no worker 'decode-9'" in out.stderr


def test_pool_rpcs_over_internal_tls(certs):
    """The registry's mutual TLS covers the pool RPCs: the cluster's certificate gets in, no certificate does not."""
    from tandem.tls import TLSConfig
    from tests.cluster.tandem_up import tandem

    internal = TLSConfig.internal(certs.cert, certs.key, certs.ca)
    reg = WorkerRegistry(FakeControl())
    address = reg.serve("127.0.0.1", 0, internal)
    try:
        with tls.channel(address, internal) as channel:
            resp = worker_pb2_grpc.RegistryStub(channel).ScalePool(wpb.ScalePoolRequest(role="prefill", replicas=2),
                                                                   timeout=5)
        assert _pools(resp)["prefill"] == (2, 2, 0, 0)
        with tls.channel(address, TLSConfig(ca_certs=certs.ca)) as channel:
            with pytest.raises(grpc.RpcError) as info:
                worker_pb2_grpc.RegistryStub(channel).GetPools(wpb.GetPoolsRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        out = tandem("drain", "--registry", address, "--worker-id", "decode-1", "--internal-tls-certfile", certs.cert,
                     "--internal-tls-keyfile", certs.key, "--internal-tls-ca-certs", certs.ca, timeout=60)
        assert out.returncode == 0 and "drained decode-1" in out.stdout, out.stderr
    finally:
        reg.stop()


def test_tandem_status_marks_draining_workers():
    from cluster.cli import format_status

    status = wpb.ClusterStatus(mode="disaggregated", workers=[
        wpb.WorkerStats(info=wpb.WorkerInfo(worker_id="decode-1", role="decode", address="10.0.0.3:1")),
        wpb.WorkerStats(info=wpb.WorkerInfo(worker_id="decode-2", role="decode", address="10.0.0.4:1", draining=True))])
    lines = format_status(status).splitlines()
    assert next(line for line in lines if line.startswith("decode-1")).split()[1] == "decode"
    assert next(line for line in lines if line.startswith("decode-2")).split()[1] == "decode*"
    assert lines[-1].startswith("* draining")
