"""A worker that stops answering with its connections open (a stopped or hung process): the router finds it
stalled by its missing stats, moves its requests to other workers at once, and takes it back when it answers."""
from __future__ import annotations

import grpc
import pytest

from tandem.v1 import generation_pb2 as pb
from tests.router.conftest import wait_for
from tests.router.helpers import Stream, text_request
from tests.router.test_failures import prefer


def _on_loop(env, fn) -> None:
    async def call():
        fn()
    env.aio.run(call())


def test_stalled_decode_worker_mid_stream_migrates_and_returns(make_env, script):
    env = make_env(prefill=1, decode=2)
    for w in env.by_role("decode"):
        w.token_delay_s = 0.05
    # The deadline is the only other way out: without stall detection this stream would end DEADLINE_EXCEEDED.
    stream = env.stub.Generate(text_request(max_tokens=12), timeout=30)
    responses = [next(stream), next(stream), next(stream)]
    victim = next(w for w in env.by_role("decode") if w.decodes)
    _on_loop(env, victim.stall)
    responses += list(stream)

    out = Stream(responses)
    assert out.token_ids == script[:12]
    assert out.text == env.model.tokenizer.decode(script[:12], skip_special_tokens=True,
                                                  clean_up_tokenization_spaces=False)
    assert out.complete.finish_reason == pb.FINISH_REASON_LENGTH
    assert out.complete.timings.num_migrations == 1
    [other] = [w for w in env.by_role("decode") if w is not victim]
    [moved] = other.decodes
    assert list(moved.request.output_token_ids) == out.token_ids[:len(moved.request.output_token_ids)]
    pool = env.router.pool
    assert not pool.workers[victim.worker_id].is_up
    # The stalled worker's call was cancelled and the request aborted there: nothing stays held when it wakes.
    engine_id = victim.decodes[0].request.request_id
    wait_for(lambda: engine_id in victim.cancelled and engine_id in victim.aborted, what="cancel and abort")

    _on_loop(env, victim.resume)
    wait_for(lambda: pool.workers[victim.worker_id].is_up, what="the worker back in the pool")
    assert Stream(env.generate(text_request(max_tokens=4))).token_ids == script[:4]


def test_stalled_prefill_worker_is_retried_elsewhere(make_env, script):
    env = make_env(prefill=2, decode=1, max_local_prefill_length=0)
    first, second = env.by_role("prefill")
    prefer(env, first, second)
    first.prefill_delay_s = 0.2
    stream = env.stub.Generate(text_request(max_tokens=6), timeout=30)
    wait_for(lambda: first.prefills, what="the prefill on the first worker")
    _on_loop(env, first.stall)

    out = Stream(list(stream))
    assert out.token_ids == script[:6]
    assert len(second.prefills) == 1
    engine_id = first.prefills[0].request.request_id
    wait_for(lambda: engine_id in first.cancelled, what="the stalled prefill cancelled")
    _on_loop(env, first.resume)
    wait_for(lambda: env.router.pool.workers[first.worker_id].is_up, what="the worker back in the pool")


def test_idle_stalled_worker_leaves_the_pool_until_it_answers(make_env, script):
    env = make_env(prefill=1, decode=2)
    victim, other = env.by_role("decode")
    pool = env.router.pool
    _on_loop(env, victim.stall)
    wait_for(lambda: not pool.workers[victim.worker_id].is_up, what="the stalled worker marked down")
    assert pool.num_live("decode") == 1
    for _ in range(3):
        assert Stream(env.generate(text_request(max_tokens=5))).token_ids == script[:5]
    assert not victim.decodes and len(other.decodes) == 3
    _on_loop(env, victim.resume)
    wait_for(lambda: pool.num_live("decode") == 2, what="the worker back in the pool")


def test_the_only_prefill_worker_stalled_long_prompts_prefill_on_the_decode_worker(make_env, script):
    env = make_env(prefill=1, decode=1, max_local_prefill_length=0)  # every prompt would be disaggregated
    [prefill], [decode] = env.by_role("prefill"), env.by_role("decode")
    pool = env.router.pool
    _on_loop(env, prefill.stall)
    wait_for(lambda: not pool.workers[prefill.worker_id].is_up, what="the stalled prefill worker marked down")
    out = Stream(env.generate(text_request(max_tokens=5)))
    assert out.token_ids == script[:5]
    assert not prefill.prefills
    assert len(decode.decodes) == 1 and not decode.decodes[0].HasField("kv"), "the decode worker prefilled it"
    _on_loop(env, prefill.resume)
    wait_for(lambda: pool.num_live("prefill") == 1, what="the prefill worker back in the pool")
    assert Stream(env.generate(text_request(max_tokens=5))).token_ids == script[:5]
    assert len(prefill.prefills) == 1, "disaggregated again"


def test_stall_timeout_option_is_validated_and_set_by_the_cli():
    from router.__main__ import parse_config
    from router.config import RouterConfig

    assert RouterConfig(registry_address="127.0.0.1:1").worker_stall_timeout_s == 1.5
    with pytest.raises(ValueError, match="worker_stall_timeout_s: must be > stats_poll_interval_s"):
        RouterConfig(registry_address="127.0.0.1:1", worker_stall_timeout_s=0.1)
    with pytest.raises(ValueError, match="worker_stall_timeout_s: must be > 0"):
        RouterConfig(registry_address="127.0.0.1:1", worker_stall_timeout_s=float("nan"))
    config, _ = parse_config(["--registry", "127.0.0.1:1", "--worker-stall-timeout-s", "3"])
    assert config.worker_stall_timeout_s == 3.0


def test_prefill_worker_stalling_during_the_kv_pull_falls_back_to_local_prefill(make_env, script):
    env = make_env(prefill=1, decode=1, max_local_prefill_length=0)
    [prefill], [decode] = env.by_role("prefill"), env.by_role("decode")
    decode.kv_pull_delay_s = 0.2
    stream = env.stub.Generate(text_request(max_tokens=6), timeout=30)
    wait_for(lambda: decode.decodes, what="the decode call with the KV handle")
    _on_loop(env, prefill.stall)  # the KV's source stops serving it mid-pull

    out = Stream(list(stream))
    assert out.token_ids == script[:6]
    assert out.complete.timings.num_migrations == 0
    with_kv, local = decode.decodes
    assert with_kv.HasField("kv") and not local.HasField("kv")
    assert list(local.request.output_token_ids) == script[:1]
    wait_for(lambda: with_kv.request.request_id in decode.cancelled, what="the stuck pull cancelled")
    _on_loop(env, prefill.resume)


def test_prefill_worker_stalling_during_the_kv_pull_with_policy_fail_ends_the_request(make_env, script):
    env = make_env(prefill=1, decode=1, max_local_prefill_length=0, kv_load_failure_policy="fail")
    [prefill], [decode] = env.by_role("prefill"), env.by_role("decode")
    decode.kv_pull_delay_s = 0.2
    stream = env.stub.Generate(text_request(max_tokens=6), timeout=30)
    wait_for(lambda: decode.decodes, what="the decode call with the KV handle")
    _on_loop(env, prefill.stall)  # the KV's source stops serving it mid-pull

    responses = []
    with pytest.raises(grpc.RpcError) as info:
        for r in stream:
            responses.append(r)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == (
        f"KV hand-off failed: decode worker {decode.worker_id} could not load the KV from prefill worker "
        f"{prefill.worker_id}: prefill worker {prefill.worker_id} stalled while the KV was pulled "
        f"(kv_load_failure_policy=fail)")
    assert Stream(responses).token_ids == script[:1]
    [with_kv] = decode.decodes  # not recomputed there
    engine_id = with_kv.request.request_id
    wait_for(lambda: engine_id in decode.cancelled and engine_id in decode.aborted, what="the stuck pull aborted")
    wait_for(lambda: prefill.prefills[0].request.request_id in prefill.aborted, what="the held KV aborted")
    _on_loop(env, prefill.resume)
