"""A worker the registry lists as draining (leaving its pool in a scale-down): the router sends it no new request,
prefill or decode, and no migrating one, while the streams it has go on to their end."""
from __future__ import annotations

import grpc
import pytest

from tandem.v1 import generation_pb2 as pb
from tandem.v1 import worker_pb2
from tests.router.conftest import wait_for
from tests.router.helpers import Stream, text_request


def _drain(env, *workers) -> None:
    for w in workers:
        w.info.draining = True
    env.register(env.workers)
    pool = env.router.pool
    wait_for(lambda: all(pool.workers[w.worker_id].info.draining for w in workers), what="the router to see it")


def test_a_draining_worker_keeps_its_stream_and_gets_no_new_request(make_env, script):
    env = make_env(prefill=2, decode=2)
    for w in env.by_role("decode"):
        w.token_delay_s = 0.05
    stream = env.stub.Generate(text_request(max_tokens=12), timeout=30)
    responses = [next(stream), next(stream), next(stream)]
    decoding = next(w for w in env.by_role("decode") if w.decodes)
    prefilled = next(w for w in env.by_role("prefill") if w.prefills)
    _drain(env, decoding, prefilled)
    pool = env.router.pool
    assert decoding.worker_id not in {w.worker_id for w in pool.live_workers("decode")}
    assert prefilled.worker_id not in {w.worker_id for w in pool.live_workers("prefill")}
    assert env.router.pool.is_ready()  # the others still serve

    for _ in range(4):  # long prompts: through a prefill worker and a KV hand-off
        assert Stream(env.generate(text_request(max_tokens=3))).token_ids == script[:3]
    assert len(decoding.decodes) == 1 and len(prefilled.prefills) == 1

    out = Stream(responses + list(stream))
    assert out.token_ids == script[:12]
    assert out.complete.finish_reason == pb.FINISH_REASON_LENGTH
    assert out.complete.timings.num_migrations == 0
    # Status counts only the workers that take requests.
    pools = {p.role: p.num_workers for p in env.cluster_stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=5).pools}
    assert pools == {"prefill": 1, "decode": 1}


def test_a_failed_stream_does_not_migrate_to_a_draining_worker(make_env, script):
    env = make_env(prefill=1, decode=2)
    draining, failing = env.by_role("decode")
    _drain(env, draining)
    failing.decode_error = (grpc.StatusCode.UNAVAILABLE, "worker went away")
    failing.decode_error_after = 2
    with pytest.raises(grpc.RpcError) as info:
        env.generate(text_request(max_tokens=8))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "no live worker" in info.value.details()
    assert draining.decodes == []


def test_with_every_worker_of_a_pool_draining_new_requests_are_unavailable(make_env):
    env = make_env(prefill=1, decode=1)
    _drain(env, *env.by_role("decode"))
    with pytest.raises(grpc.RpcError) as info:
        env.generate(text_request(max_tokens=3))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "decode pool" in info.value.details()
    assert not env.router.pool.is_ready()
