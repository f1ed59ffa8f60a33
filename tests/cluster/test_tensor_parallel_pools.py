"""Prefill and decode pools of different TP sizes in a real local cluster (Ray, a router, real gRPC): the decode
worker pulls every KV shard the prefill group staged and regroups them for its own ranks. Greedy tokens match the
offline engine at TP 1. Its own module: each case starts its own Ray cluster, after test_tensor_parallel_cluster's
has gone."""
from __future__ import annotations

import pytest

from tandem.v1 import generation_pb2 as pb
from tests.cluster.test_cluster_e2e import _generate, _greedy, _wait_all_free
from tests.cluster.test_tensor_parallel_cluster import ENGINE, _cluster
from tests.workers.prompts import RAW_PROMPTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):
    return str(tiny_checkpoint("llama"))


@pytest.fixture(scope="module")
def offline(folder):
    from workers import LLM

    llm = LLM(folder, **ENGINE)
    yield llm
    llm.shutdown()


@pytest.mark.parametrize("prefill_tp, decode_tp", [(2, 1), (1, 2)])
def test_prefill_and_decode_pools_of_different_tp_sizes(folder, offline, prefill_tp, decode_tp):
    from workers import SamplingParams

    prompt = RAW_PROMPTS[1]
    expected = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    with _cluster(folder, prefill_tp, decode_tp, num_decode_workers=1) as (controller, stub):
        tokens, _, _ = _generate(stub, pb.GenerateRequest(text=prompt, sampling=_greedy(16, ignore_eos=True)))
        stats = {s.info.role: s for s in _wait_all_free(controller)}
    assert tokens == expected.token_ids
    assert (stats["prefill"].info.tp_size, stats["decode"].info.tp_size) == (prefill_tp, decode_tp)
    assert stats["decode"].kv_transfers == 1 and stats["prefill"].num_kv_held == 0
