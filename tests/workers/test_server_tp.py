"""KV hand-off between workers of different TP sizes, over real gRPC and the KV transport: the prefill worker
stages every rank's shard, its KVHandle carries its TP size, and the decode worker pulls them all and regroups
them for its own ranks. Greedy tokens match one TP 1 engine."""
from __future__ import annotations

import grpc
import pytest

from tandem.v1 import generation_pb2 as pb
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc
from workers import LLM, SamplingParams

ENGINE = dict(kv_cache_memory_bytes=32 << 20, max_model_len=512)
PROMPT = [100 + 7 * i for i in range(70)]  # 5 blocks of 16, the last partial
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):
    return str(tiny_checkpoint("llama"))


@pytest.fixture(scope="module")
def expected(folder):
    with LLM(folder, **ENGINE) as llm:
        (out,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return out.token_ids


def _hand_off(folder: str, prefill_tp: int, decode_tp: int) -> tuple[list[int], wpb.KVHandle, list]:
    """Prefill on a TP `prefill_tp` worker, decode on a TP `decode_tp` one; (tokens, the handle, both stats)."""
    from workers.server import WorkerConfig, WorkerServer

    def worker(role, tp):
        engine = {**ENGINE, "model": folder, "tensor_parallel_size": tp}
        return WorkerServer(WorkerConfig(role=role, engine=engine, kv_transport="shm", torch_threads=1, metrics_port=-1))

    servers = [worker("prefill", prefill_tp), worker("decode", decode_tp)]
    try:
        prefill, decode = [s.start() for s in servers]
        req = wpb.EngineRequest(request_id="r1", prompt_token_ids=PROMPT,
                                sampling=pb.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
        with grpc.insecure_channel(prefill.address) as p, grpc.insecure_channel(decode.address) as d:
            first = worker_pb2_grpc.WorkerStub(p).Prefill(wpb.PrefillRequest(request=req), timeout=120)
            tokens = list(first.token_ids)
            for msg in worker_pb2_grpc.WorkerStub(d).Decode(wpb.DecodeRequest(request=req, kv=first.kv), timeout=120):
                tokens += msg.token_ids
        stats = [s.stats() for s in servers]
        return tokens, first.kv, stats
    finally:
        for s in servers:
            if s.info is not None:
                s.stop()


@pytest.mark.parametrize("prefill_tp, decode_tp", [(2, 1), (1, 2)])
def test_hand_off_between_tp_sizes_matches_tp1(folder, expected, prefill_tp, decode_tp):
    tokens, handle, stats = _hand_off(folder, prefill_tp, decode_tp)
    assert tokens == expected
    # One shard per prefill rank, all staged on the prefill worker's transport.
    assert handle.tp_size == prefill_tp
    assert len(handle.endpoints) == prefill_tp
    prefill_stats, decode_stats = stats
    assert prefill_stats.info.tp_size == prefill_tp and decode_stats.info.tp_size == decode_tp
    # The decode side acknowledged the last shard: nothing stays held on the prefill worker.
    assert prefill_stats.num_kv_held == 0
    assert decode_stats.kv_transfer_bytes == handle.num_bytes > 0
