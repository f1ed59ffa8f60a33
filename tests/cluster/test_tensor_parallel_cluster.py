"""Tensor-parallel workers in a real local cluster: one prefill and two decode workers at TP 2, each rank 0 in its
WorkerActor and rank 1 a TPRankActor in the same placement group (gloo on CPU), behind a router over real gRPC.
Greedy tokens match the offline engine at TP 1; killing a decode worker's rank 1 mid-stream takes the whole
worker down, the stream moves to the other decode worker and completes, and the worker is replaced."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

import grpc
import pytest

from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc
from tests.cluster.test_cluster_e2e import _generate, _greedy, _LoopThread, _wait_all_free
from tests.workers.prompts import RAW_PROMPTS

pytestmark = pytest.mark.slow

ENGINE = dict(max_num_seqs=8, kv_cache_memory_bytes=32 << 20, max_model_len=1024)


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):
    return str(tiny_checkpoint("llama"))


@contextmanager
def _cluster(folder: str, prefill_tp: int, decode_tp: int, num_decode_workers: int):
    """(controller, Generation stub) of a running cluster: one prefill worker, the decode workers, a router."""
    from cluster.config import ClusterConfig
    from cluster.controller import Controller
    from router.config import RouterConfig
    from router.server import Router

    # Up to 3 workers x 2 ranks on a 2-core machine: half a CPU per rank.
    controller = Controller(ClusterConfig(
        model=folder, num_prefill_workers=1, num_decode_workers=num_decode_workers,
        prefill_tensor_parallel_size=prefill_tp, decode_tensor_parallel_size=decode_tp, num_cpus_per_rank=0.5,
        engine=ENGINE, health_check_period_s=0.5))
    loops = _LoopThread()
    router = None
    try:
        registry = controller.start()
        # max_local_prefill_length=0: every prompt goes through the prefill worker and a KV hand-off.
        router = Router(RouterConfig(port=0, http_port=0, registry_address=registry, model=folder,
                                     max_local_prefill_length=0))
        address = loops.run(router.start())
        loops.run(router.wait_ready(timeout_s=60))
        channel = grpc.insecure_channel(address)
        yield controller, generation_pb2_grpc.GenerationStub(channel)
        channel.close()
    finally:
        if router is not None:
            loops.run(router.stop(grace_s=1))
        loops.close()
        controller.stop()


@pytest.fixture(scope="module")
def cluster(folder):
    with _cluster(folder, prefill_tp=2, decode_tp=2, num_decode_workers=2) as running:
        yield running


@pytest.fixture(scope="module")
def offline(folder):
    from workers import LLM

    llm = LLM(folder, **ENGINE)
    yield llm
    llm.shutdown()


def test_tp2_workers_match_the_offline_engine_at_tp1(cluster, offline):
    from workers import SamplingParams

    controller, stub = cluster
    assert sorted((w.role, w.tp_size) for w in controller.workers()) == [("decode", 2), ("decode", 2), ("prefill", 2)]
    for prompt in RAW_PROMPTS[:3]:
        expected = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
        tokens, text, complete = _generate(stub, pb.GenerateRequest(text=prompt, sampling=_greedy(24, ignore_eos=True)))
        assert tokens == expected.token_ids, prompt
        assert text == expected.text
        assert complete.finish_reason == pb.FINISH_REASON_LENGTH
    stats = _wait_all_free(controller)
    assert sum(s.kv_transfers for s in stats if s.info.role == "decode") == 3  # every prompt was handed off
    for s in stats:
        assert s.num_kv_held == 0 and s.num_used_blocks == 0, s


def test_killing_a_decode_rank_mid_stream_replaces_its_worker_and_the_stream_completes(cluster, offline):
    """Last: it kills a rank. Its whole worker goes (rank 0 too), the stream migrates, a new worker starts."""
    import ray

    from workers import SamplingParams

    controller, stub = cluster
    prompt = RAW_PROMPTS[2]
    expected = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0]
    call = stub.Generate(pb.GenerateRequest(text=prompt, sampling=_greedy(64, ignore_eos=True)), timeout=180)
    tokens, complete, victim = [], None, None
    for resp in call:
        if resp.HasField("chunk"):
            tokens += resp.chunk.token_ids
            if victim is None and len(tokens) >= 8:
                busy = [s for s in controller.worker_stats() if s.info.role == "decode" and s.num_running > 0]
                assert len(busy) == 1
                victim = busy[0].info
                ray.kill(ray.get_actor(f"tandem-{victim.worker_id}-tp1"), no_restart=True)
        else:
            complete = resp.complete
    assert victim is not None
    assert tokens == expected.token_ids
    assert complete.finish_reason == pb.FINISH_REASON_LENGTH
    assert complete.timings.num_migrations >= 1
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = {w.worker_id: w for w in controller.workers()}
        if victim.worker_id not in now and sum(w.role == "decode" for w in now.values()) == 2:
            break
        time.sleep(1)
    now = {w.worker_id: w for w in controller.workers()}
    assert victim.worker_id not in now
    assert sorted(w.tp_size for w in now.values() if w.role == "decode") == [2, 2]
    assert not _alive(victim.pid, timeout_s=30), "the dead rank's rank 0 was stopped with it"
    tokens, _, _ = _generate(stub, pb.GenerateRequest(text=prompt, sampling=_greedy(16, ignore_eos=True)))
    assert tokens == expected.token_ids[:16]


def _alive(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.5)
    return True
