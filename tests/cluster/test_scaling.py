"""Pools resized while a real cluster serves (Controller.scale_pool, the autoscaler's actuator): a new worker
joins, a leaving one drains (its stream finishes there, no new request reaches it) and stops; one that outlasts
drain_timeout_s is stopped and its stream moves."""
from __future__ import annotations

import dataclasses
import threading
import time

import grpc
import pytest

from cluster.pools import PoolReplicas
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc
from tests.cluster.test_cluster_e2e import ENGINE, _LoopThread
from tests.workers.prompts import RAW_PROMPTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scaled():
    from cluster.config import ClusterConfig
    from cluster.controller import Controller
    from router.config import RouterConfig
    from router.server import Router

    controller = Controller(ClusterConfig(num_prefill_workers=1, num_decode_workers=1, engine=ENGINE,
                                          health_check_period_s=0.5, max_workers_per_pool=2))
    loops = _LoopThread()
    router = None
    try:
        registry = controller.start()
        router = Router(RouterConfig(port=0, http_port=-1, registry_address=registry, max_local_prefill_length=0))
        address = loops.run(router.start())
        loops.run(router.wait_ready(timeout_s=60))
        channel = grpc.insecure_channel(address)
        yield controller, router, generation_pb2_grpc.GenerationStub(channel)
        channel.close()
    finally:
        if router is not None:
            loops.run(router.stop(grace_s=1))
        loops.close()
        controller.stop()


def wait_for(predicate, timeout_s: float = 240, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


class Stream:
    """One greedy streamed Generate on a thread; records its tokens, completion or error."""

    def __init__(self, stub, max_tokens: int, prompt: str = RAW_PROMPTS[2]):
        self.tokens: list[int] = []
        self.complete = None
        self.error = None
        req = pb.GenerateRequest(text=prompt, sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                          ignore_eos=True))
        self._thread = threading.Thread(target=self._run, args=(stub, req), daemon=True)
        self._thread.start()

    def _run(self, stub, req):
        try:
            for resp in stub.Generate(req, timeout=300):
                if resp.HasField("chunk"):
                    self.tokens += resp.chunk.token_ids
                else:
                    self.complete = resp.complete
        except grpc.RpcError as e:
            self.error = e

    def join(self):
        self._thread.join(300)
        assert self.error is None, self.error
        return self


def decode_stats(controller):
    return {s.info.worker_id: s for s in controller.worker_stats() if s.info.role == "decode"}


def test_scale_up_then_drain_down_loses_no_request(scaled):
    controller, router, stub = scaled
    assert controller.pool_status() == {"prefill": PoolReplicas(1, 1), "decode": PoolReplicas(1, 1)}

    controller.scale_pool("decode", 2)
    assert controller.pool_status()["decode"].desired == 2
    wait_for(lambda: controller.pool_status()["decode"] == PoolReplicas(2, 2), what="a second decode worker")
    wait_for(lambda: router.pool.num_live("decode") == 2, what="the router to see it")
    newest = max((w for w in controller._workers.values() if w.role == "decode"), key=lambda w: w.started)

    # One long stream on each decode worker (the router balances by load).
    streams = [Stream(stub, 160), Stream(stub, 160)]
    wait_for(lambda: all(s.num_running for s in decode_stats(controller).values()) and
             all(len(s.tokens) >= 4 for s in streams), what="a stream on each decode worker")

    controller.scale_pool("decode", 1)  # the newest ready worker leaves
    status = controller.pool_status()["decode"]
    assert (status.desired, status.ready, status.draining) == (1, 1, 1)
    listed = {w.worker_id: w for w in controller.workers()}
    assert listed[newest.worker_id].draining
    wait_for(lambda: not any(w.worker_id == newest.worker_id for w in router.pool.live_workers("decode")),
             timeout_s=10, what="the router to stop choosing the draining worker")

    # A request that arrives during the drain goes to the other worker and completes.
    short = Stream(stub, 8).join()
    assert len(short.tokens) == 8
    for s in streams:
        s.join()
        assert len(s.tokens) == 160
        assert s.complete.finish_reason == pb.FINISH_REASON_LENGTH
        assert s.complete.timings.num_migrations == 0  # the draining worker finished its own stream
    wait_for(lambda: controller.pool_status()["decode"] == PoolReplicas(1, 1), what="the drained worker to stop")
    assert newest.worker_id not in {w.worker_id for w in controller.workers()}
    # Stays at 1: the health loop does not replace a drained worker.
    time.sleep(2)
    assert controller.pool_status()["decode"] == PoolReplicas(1, 1)


def test_a_drain_past_its_timeout_moves_the_stream(scaled):
    controller, router, stub = scaled
    controller.config = dataclasses.replace(controller.config, drain_timeout_s=1.0)
    controller.scale_pool("decode", 2)
    wait_for(lambda: controller.pool_status()["decode"] == PoolReplicas(2, 2), what="a second decode worker")
    wait_for(lambda: router.pool.num_live("decode") == 2, what="the router to see it")
    streams = [Stream(stub, 200), Stream(stub, 200)]
    wait_for(lambda: all(s.num_running for s in decode_stats(controller).values()) and
             all(len(s.tokens) >= 4 for s in streams), what="a stream on each decode worker")
    controller.scale_pool("decode", 1)
    for s in streams:
        s.join()
        assert len(s.tokens) == 200 and s.complete.finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(s.complete.timings.num_migrations for s in streams) >= 1
    wait_for(lambda: controller.pool_status()["decode"] == PoolReplicas(1, 1), what="the pool back at 1")


def test_bad_arguments_are_named(scaled):
    controller, _, _ = scaled
    with pytest.raises(ValueError, match="role: must be one of prefill, decode, got 'both'"):
        controller.scale_pool("both", 1)
    with pytest.raises(ValueError, match="replicas"):
        controller.scale_pool("decode", -1)
    with pytest.raises(ValueError, match="replicas"):
        controller.scale_pool("decode", 1.5)
    with pytest.raises(ValueError, match=r"replicas: at most 2 \(the cluster's max_workers_per_pool\), got 3"):
        controller.scale_pool("decode", 3)
    assert controller.pool_status()["decode"].desired == 1
