"""`tandem controller` as the KubeRay head pod runs it: joins a Ray cluster whose worker nodes offer the pool
resources (as a worker group's pods do), one worker per node, each pool sized to its nodes; a node that leaves
takes its worker with it, and nobody replaces it elsewhere. The registry serves the pools to remote actuators."""
from __future__ import annotations

import argparse
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from cluster import controller_cli
from tandem import tls
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc
from tests.cluster.tandem_up import UP_TIMEOUT_S, free_port, tandem


def _parse(*argv: str):
    parser = argparse.ArgumentParser()
    controller_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["controller", *argv])


def test_options_build_the_cluster_config():
    args = _parse("--redis-url", "redis://r:6379", "--ray-address", "auto", "--pool-resources", "--follow-nodes",
                  "--tensor-parallel-size", "1", "--max-num-seqs", "8")
    config = controller_cli.cluster_config(args, None, registry_host=args.registry_host,
                                           registry_port=args.registry_port, pool_resources=args.pool_resources,
                                           follow_nodes=args.follow_nodes, drain_timeout_s=args.drain_timeout_s)
    assert (config.registry_host, config.registry_port) == ("0.0.0.0", 50100)
    assert config.pool_resources and config.follow_nodes and config.drain_timeout_s == 60
    assert config.ray_address == "auto" and config.resolved_kv_transport == "tcp"
    assert config.redis_url == "redis://r:6379" and config.engine == {"max_num_seqs": 8}


def test_tensor_parallel_sizes_per_pool():
    def sizes(*argv):
        config = controller_cli.cluster_config(_parse("--redis-url", "redis://r:6379", *argv), None)
        return config.prefill_tensor_parallel_size, config.decode_tensor_parallel_size

    assert sizes() == (1, 1)
    # The default model has 9 query and 3 KV heads: TP 3 divides both.
    assert sizes("--tensor-parallel-size", "3") == (3, 3)
    assert sizes("--tensor-parallel-size", "3", "--decode-tensor-parallel-size", "1") == (3, 1)
    assert sizes("--prefill-tensor-parallel-size", "1", "--decode-tensor-parallel-size", "3") == (1, 3)
    with pytest.raises(ValueError, match="^prefill_tensor_parallel_size: must be >= 1"):
        sizes("--prefill-tensor-parallel-size", "0")


def test_gpu_engine_options_reach_the_engine():
    args = _parse("--redis-url", "redis://r:6379", "--max-num-seqs", "8", "--attention-backend", "sdpa",
                  "--enforce-eager", "--cudagraph-capture-sizes", "4,1,2")
    config = controller_cli.cluster_config(args, None)
    assert config.engine == {"max_num_seqs": 8, "attention_backend": "sdpa", "enforce_eager": True,
                             "cudagraph_capture_sizes": [4, 1, 2]}


@pytest.mark.parametrize("argv, message", [
    ((), "the following arguments are required: --redis-url"),
    (("--redis-url", "redis://r:6379", "--ssl-certfile", "x.pem"),
     "--ssl-certfile: the controller serves no client front"),
    (("--redis-url", "http://r"), "redis_url"),
    (("--redis-url", "redis://r:6379", "--drain-timeout-s", "-1"), "drain_timeout_s: must be >= 0"),
    # Engine options are checked before Ray starts, not by every worker's engine.
    (("--redis-url", "redis://r:6379", "--max-num-seqs", "8", "--cudagraph-capture-sizes", "1,16"),
     "cudagraph_capture_sizes: must be non-empty, each in [1, max_num_seqs=8]"),
    (("--redis-url", "redis://r:6379", "--attention-backend", "flash"), "--attention-backend: invalid choice: 'flash'"),
    (("--redis-url", "redis://r:6379", "--cudagraph-capture-sizes", "1,two"),
     "--cudagraph-capture-sizes: want comma-separated integers"),
])
def test_bad_options_are_refused_naming_them(argv, message):
    out = tandem("controller", *argv, timeout=60)
    assert out.returncode == 2 and message in out.stderr, out.stderr


class _Controller:
    """`tandem controller ...` in a subprocess, read until its banner."""

    def __init__(self, argv: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "controller", *argv], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()
        self.wait_line("tandem controller: registry at", UP_TIMEOUT_S)

    def wait_line(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.log.append(line)
            if text in line:
                return line
        pytest.fail(f"no {text!r} from tandem controller:\n" + "".join(self.log))


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
def test_pools_follow_the_nodes_offering_their_resource(redis_server):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    controller = None
    try:
        cluster.add_node(num_cpus=1, resources={"tandem_prefill": 1})
        cluster.add_node(num_cpus=1, resources={"tandem_decode": 1})
        port = free_port()
        controller = _Controller([
            "--ray-address", cluster.address, "--registry-host", "127.0.0.1", "--registry-port", str(port),
            "--pool-resources", "--follow-nodes", "--redis-url", redis_server.url,
            "--max-num-seqs", "8", "--kv-cache-memory-bytes", str(128 << 20)])
        with tls.channel(f"127.0.0.1:{port}", None) as channel:
            stub = worker_pb2_grpc.RegistryStub(channel)

            def pools():
                resp = stub.GetPools(wpb.GetPoolsRequest(), timeout=5)
                return {p.role: (p.desired, p.ready, p.starting, p.draining) for p in resp.pools}

            def decode_ids():
                return {w.worker_id for w in stub.ListWorkers(wpb.ListWorkersRequest(), timeout=5).workers
                        if w.role == "decode"}

            assert pools() == {"prefill": (1, 1, 0, 0), "decode": (1, 1, 0, 0)}
            [first] = decode_ids()
            # The nodes size the pools: a remote ScalePool would be undone at the next look, so it is refused.
            with pytest.raises(grpc.RpcError) as info:
                stub.ScalePool(wpb.ScalePoolRequest(role="decode", replicas=2), timeout=5)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "follow the Ray nodes" in info.value.details()

            # A pod joins the decode worker group: the pool grows by one worker, on that node.
            second_node = cluster.add_node(num_cpus=1, resources={"tandem_decode": 1})
            _wait_for(lambda: pools()["decode"] == (2, 2, 0, 0), UP_TIMEOUT_S, "a worker on the new node")
            assert first in decode_ids() and len(decode_ids()) == 2

            # It leaves: its worker goes with it and is not started elsewhere (no node offers the resource).
            cluster.remove_node(second_node)
            _wait_for(lambda: pools()["decode"] == (1, 1, 0, 0) and decode_ids() == {first}, 60, "the pool at 1")
            time.sleep(3)
            assert pools() == {"prefill": (1, 1, 0, 0), "decode": (1, 1, 0, 0)} and decode_ids() == {first}

            # A pod's preStop drains its worker: gone, and not started again on that node while it still lives.
            resp = stub.DrainWorker(wpb.DrainWorkerRequest(worker_id=first, wait=True), timeout=120)
            assert list(resp.worker_ids) == [first]
            assert pools()["decode"] == (0, 0, 0, 0) and decode_ids() == set()
            time.sleep(3)
            assert pools() == {"prefill": (1, 1, 0, 0), "decode": (0, 0, 0, 0)}

        controller.proc.send_signal(signal.SIGTERM)
        assert controller.proc.wait(60) == 0
        controller.wait_line("tandem controller: stopped", 5)
    finally:
        if controller is not None and controller.proc.poll() is None:
            controller.proc.kill()
            controller.proc.wait(10)
        cluster.shutdown()
