"""Cancellation, deadlines and worker failures: the client's stream stays correct and no KV stays held."""
from __future__ import annotations

import grpc
import pytest

from tandem.v1 import generation_pb2 as pb
from tests.router.conftest import wait_for
from tests.router.helpers import Stream, text_request
from tests.router.test_tracing import value


def test_client_cancel_mid_decode_cancels_the_call_and_aborts(make_env):
    env = make_env(prefill=1, decode=1)
    [prefill], [decode] = env.by_role("prefill"), env.by_role("decode")
    decode.token_delay_s = 0.05
    call = env.stub.Generate(text_request(max_tokens=200), timeout=30)
    next(call), next(call)
    call.cancel()
    engine_id = decode.decodes[0].request.request_id
    wait_for(lambda: engine_id in decode.cancelled and engine_id in decode.aborted, what="decode aborted")
    assert not prefill.held
    wait_for(lambda: env.router.num_active == 0, what="request gone")


def test_client_cancel_during_prefill_aborts_the_prefill_worker(make_env):
    env = make_env(prefill=1, decode=1)
    [prefill], [decode] = env.by_role("prefill"), env.by_role("decode")
    prefill.prefill_delay_s = 30
    call = env.stub.Generate(text_request(), timeout=30)
    wait_for(lambda: prefill.prefills, what="prefill started")
    call.cancel()
    engine_id = prefill.prefills[0].request.request_id
    wait_for(lambda: engine_id in prefill.cancelled and engine_id in prefill.aborted, what="prefill aborted")
    assert not decode.decodes
    wait_for(lambda: env.router.admission.num_queued("prefill") == env.router.admission.num_queued("decode") == 0,
             what="admission released")


def test_cancel_between_prefill_and_decode_frees_held_kv(make_env):
    env = make_env(prefill=1, decode=1)
    [prefill], [decode] = env.by_role("prefill"), env.by_role("decode")
    decode.kv_pull_delay_s = 30
    call = env.stub.Generate(text_request(), timeout=30)
    next(call)  # the first token: the prefill worker holds the KV until the decode worker pulls it
    wait_for(lambda: decode.decodes, what="decode started")
    assert prefill.held
    call.cancel()
    wait_for(lambda: not prefill.held, what="KV released by Abort")
    wait_for(lambda: decode.cancelled, what="decode call cancelled")


def test_deadline_during_prefill_is_deadline_exceeded_and_aborts(make_env):
    env = make_env(prefill=1, decode=1)
    [prefill] = env.by_role("prefill")
    prefill.prefill_delay_s = 30
    with pytest.raises(grpc.RpcError) as info:
        list(env.stub.Generate(text_request(), timeout=0.3))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    engine_id = prefill.prefills[0].request.request_id
    wait_for(lambda: engine_id in prefill.aborted, what="prefill aborted")


def test_deadline_during_decode_is_deadline_exceeded_and_aborts(make_env):
    env = make_env(prefill=1, decode=1)
    [decode] = env.by_role("decode")
    decode.token_delay_s = 0.1
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for r in env.stub.Generate(text_request(max_tokens=200), timeout=0.5):
            got.append(r)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert got, "tokens streamed before the deadline"
    engine_id = decode.decodes[0].request.request_id
    wait_for(lambda: engine_id in decode.aborted, what="decode aborted")
    assert decode.decodes[0].request.HasField("sampling")


def prefer(env, first, second) -> None:
    """Make the policy pick `first` over `second` (more free blocks, fewer queued tokens) and wait until it sees so."""
    second.stats.num_free_blocks, second.stats.num_waiting_tokens = 500, 100
    pool = env.router.pool
    wait_for(lambda: pool.workers[second.worker_id].stats.num_free_blocks == 500, what="stats seen")


def test_decode_worker_failing_mid_stream_migrates_seamlessly(make_env, script):
    env = make_env(prefill=1, decode=2)
    [prefill], (first, second) = env.by_role("prefill"), env.by_role("decode")
    prefer(env, first, second)
    first.decode_error, first.decode_error_after = (grpc.StatusCode.UNAVAILABLE, "worker died"), 3
    out = Stream(env.generate(text_request(max_tokens=12)))

    assert out.token_ids == script[:12]
    full = env.model.tokenizer.decode(script[:12], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert out.text == full
    assert [c.completion_tokens for c in out.chunks] == list(range(1, 13))
    assert out.complete.finish_reason == pb.FINISH_REASON_LENGTH
    assert out.complete.timings.num_migrations == 1
    [moved] = second.decodes
    assert not moved.HasField("kv")
    assert list(moved.request.output_token_ids) == script[:4]  # 1 from prefill + 3 from the failed worker
    assert list(moved.request.prompt_token_ids) == list(prefill.prefills[0].request.prompt_token_ids)


def test_migration_after_a_real_worker_crash(make_env, script):
    env = make_env(prefill=1, decode=2)
    for w in env.by_role("decode"):
        w.token_delay_s = 0.05
    stream = env.stub.Generate(text_request(max_tokens=10), timeout=10)
    responses = [next(stream), next(stream), next(stream)]
    victim = next(w for w in env.by_role("decode") if w.decodes)
    env.aio.run(victim.stop())  # the process dies: its connections drop
    responses += list(stream)
    out = Stream(responses)
    assert out.token_ids == script[:10]
    assert out.complete.timings.num_migrations == 1


def test_migrations_are_bounded(make_env):
    env = make_env(prefill=1, decode=2, max_migrations=1)
    for w in env.by_role("decode"):
        w.decode_error, w.decode_error_after = (grpc.StatusCode.UNAVAILABLE, "worker died"), 1
    with pytest.raises(grpc.RpcError) as info:
        list(env.stub.Generate(text_request(max_tokens=12), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "decode pool" in info.value.details()


def test_prefill_unavailable_is_retried_on_another_worker(make_env, script):
    env = make_env(prefill=2, decode=1)
    first, second = env.by_role("prefill")
    prefer(env, first, second)
    first.prefill_error = (grpc.StatusCode.UNAVAILABLE, "shutting down")
    out = Stream(env.generate(text_request(max_tokens=5)))
    assert out.token_ids == script[:5]
    assert len(first.prefills) == len(second.prefills) == 1


def test_no_prefill_worker_left_prefills_on_the_decode_worker(make_env, script):
    env = make_env(prefill=2, decode=1, max_prefill_retries=5)
    for w in env.by_role("prefill"):
        w.prefill_error = (grpc.StatusCode.UNAVAILABLE, "gone")
    [decode] = env.by_role("decode")
    out = Stream(env.generate(text_request(max_tokens=5)))
    assert out.token_ids == script[:5]
    assert out.complete.finish_reason == pb.FINISH_REASON_LENGTH
    assert [len(w.prefills) for w in env.by_role("prefill")] == [1, 1], "each prefill worker was tried once"
    assert len(decode.decodes) == 1 and not decode.decodes[0].HasField("kv"), "the decode worker prefilled it"


def test_no_worker_in_either_pool_is_unavailable(make_env):
    env = make_env(prefill=1, decode=1)
    env.by_role("prefill")[0].prefill_error = (grpc.StatusCode.UNAVAILABLE, "gone")
    env.by_role("decode")[0].decode_error = (grpc.StatusCode.UNAVAILABLE, "gone")
    with pytest.raises(grpc.RpcError) as info:
        list(env.stub.Generate(text_request(), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "decode pool" in info.value.details()


def test_kv_pull_failure_falls_back_to_local_prefill(make_env, script):
    env = make_env(prefill=1, decode=1)
    [prefill], [decode] = env.by_role("prefill"), env.by_role("decode")
    decode.kv_error = True
    out = Stream(env.generate(text_request(max_tokens=6)))
    assert out.token_ids == script[:6]
    assert out.complete.timings.num_migrations == 0
    with_kv, fallback = decode.decodes
    assert with_kv.HasField("kv") and not fallback.HasField("kv")
    assert list(fallback.request.output_token_ids) == script[:1]
    # The KV the decode worker could not pull is released on the prefill side.
    wait_for(lambda: prefill.prefills[0].request.request_id in prefill.aborted, what="held KV aborted")
    assert not prefill.held
    assert value(env.router.telemetry.metrics_text()[0], "tandem_router_kv_load_failures_total",
                 action="recompute") == 1


def test_kv_pull_failure_with_policy_fail_ends_the_request_unavailable(make_env, script):
    env = make_env(prefill=1, decode=1, kv_load_failure_policy="fail")
    [prefill], [decode] = env.by_role("prefill"), env.by_role("decode")
    decode.kv_error = True
    responses = []
    with pytest.raises(grpc.RpcError) as info:
        for r in env.stub.Generate(text_request(max_tokens=6), timeout=10):
            responses.append(r)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == (
        f"KV hand-off failed: decode worker {decode.worker_id} could not load the KV from prefill worker "
        f"{prefill.worker_id}: kv: transfer not found (lease expired?) (kv_load_failure_policy=fail)")
    # The first token (from the prefill worker) was streamed; nothing was recomputed.
    assert Stream(responses).token_ids == script[:1]
    [with_kv] = decode.decodes
    assert with_kv.HasField("kv")
    # Everything held is released: the prefill worker's KV, the admission slots.
    wait_for(lambda: prefill.prefills[0].request.request_id in prefill.aborted, what="held KV aborted")
    assert not prefill.held
    wait_for(lambda: env.router.num_active == 0, what="request gone")
    assert env.router.admission.num_queued("prefill") == env.router.admission.num_queued("decode") == 0
    text = env.router.telemetry.metrics_text()[0]
    assert value(text, "tandem_router_kv_load_failures_total", action="fail") == 1
    assert value(text, "tandem_router_requests_total", status="error", error_type="UNAVAILABLE") == 1


def test_kv_load_failure_policy_is_validated_and_set_by_the_cli(capsys):
    from router.__main__ import parse_config
    from router.config import RouterConfig

    assert RouterConfig(registry_address="127.0.0.1:1").kv_load_failure_policy == "recompute"
    with pytest.raises(ValueError) as info:
        RouterConfig(registry_address="127.0.0.1:1", kv_load_failure_policy="abort")
    assert str(info.value) == "kv_load_failure_policy: must be one of recompute, fail, got 'abort'"
    config, _ = parse_config(["--registry", "127.0.0.1:1", "--kv-load-failure-policy", "fail"])
    assert config.kv_load_failure_policy == "fail"
    assert parse_config(["--registry", "127.0.0.1:1"])[0].kv_load_failure_policy == "recompute"
    with pytest.raises(SystemExit):
        parse_config(["--registry", "127.0.0.1:1", "--kv-load-failure-policy", "abort"])
    assert "--kv-load-failure-policy: invalid choice: 'abort'" in capsys.readouterr().err
