"""The router's other services and its lifecycle: health, reflection, ListModels, Tokenize, GetStatus, draining."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tandem.v1 import generation_pb2 as pb
from tandem.v1 import worker_pb2
from tests.router.conftest import wait_for
from tests.router.helpers import Stream, text_request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(env, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(env.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_follows_the_pools(make_env):
    env = make_env(prefill=1, decode=1)
    wait_for(lambda: health(env) == SERVING, what="SERVING")
    assert health(env, "tandem.v1.Generation") == SERVING
    env.register(env.by_role("prefill"))  # the decode worker leaves the registry
    wait_for(lambda: health(env) == NOT_SERVING, what="NOT_SERVING")
    assert health(env, "tandem.v1.Generation") == NOT_SERVING
    err = pytest.raises(grpc.RpcError, env.generate, text_request()).value
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "decode pool" in err.details()
    env.register(env.workers)
    wait_for(lambda: health(env) == SERVING, what="SERVING again")


def test_health_not_serving_without_workers(make_env):
    env = make_env(prefill=0, decode=0, wait_ready=False)
    wait_for(lambda: health(env) == NOT_SERVING, what="NOT_SERVING")
    with pytest.raises(TimeoutError, match="prefill, decode pool"):
        env.aio.run(env.router.wait_ready(timeout_s=0.1))


def test_reflection_lists_the_services(make_env):
    env = make_env()
    services = set(ProtoReflectionDescriptorDatabase(env.channel).get_services())
    assert {"tandem.v1.Generation", "tandem.v1.Cluster", "grpc.health.v1.Health"} <= services


def test_list_models(make_env):
    env = make_env()
    [card] = env.stub.ListModels(pb.ListModelsRequest(), timeout=5).models
    assert (card.id, card.max_model_len, card.owned_by) == (env.model.name, 512, "tandem")


def test_tokenize_text_and_chat(make_env):
    env = make_env()
    tok = env.model.tokenizer
    resp = env.stub.Tokenize(pb.TokenizeRequest(text="Hello there"), timeout=5)
    assert list(resp.token_ids) == tok.encode("Hello there", add_special_tokens=True)
    assert resp.count == len(resp.token_ids) and resp.max_model_len == 512
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="system", content="Be brief."),
                                     pb.ChatMessage(role="user", content="Hi")])
    resp = env.stub.Tokenize(pb.TokenizeRequest(chat=chat), timeout=5)
    rendered = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                       tokenize=False, add_generation_prompt=True)
    assert list(resp.token_ids) == tok.encode(rendered, add_special_tokens=False)
    with pytest.raises(grpc.RpcError) as info:
        env.stub.Tokenize(pb.TokenizeRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        env.stub.Tokenize(pb.TokenizeRequest(model="other", text="x"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_get_status(make_env):
    env = make_env(prefill=1, decode=2, max_queued_requests=7)
    status = env.cluster_stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=5)
    assert status.mode == "disaggregated" and status.registry_address == env.registry.address
    pools = {p.role: (p.num_workers, p.num_queued, p.max_queued) for p in status.pools}
    assert pools == {"prefill": (1, 0, 7), "decode": (2, 0, 7)}
    assert {w.info.worker_id for w in status.workers} == {w.worker_id for w in env.workers}
    assert all(w.num_blocks == 1000 for w in status.workers)


def test_colocated_status_has_one_pool(make_env):
    env = make_env(prefill=0, decode=0, both=2)
    status = env.cluster_stub.GetStatus(worker_pb2.GetStatusRequest(), timeout=5)
    assert status.mode == "colocated" and [(p.role, p.num_workers) for p in status.pools] == [("both", 2)]


def test_drain_refuses_new_requests_and_lets_running_ones_finish(make_env, script):
    env = make_env(prefill=1, decode=1)
    [decode] = env.by_role("decode")
    decode.token_delay_s = 0.02
    running = env.stub.Generate(text_request(max_tokens=12), timeout=30)
    first = next(running)
    stopping = env.aio.submit(env.router.stop(grace_s=10))
    wait_for(lambda: env.router.draining, what="draining")
    err = pytest.raises(grpc.RpcError, env.generate, text_request()).value
    assert err.code() == grpc.StatusCode.UNAVAILABLE and err.details() == "router is draining"
    assert health(env) == NOT_SERVING
    out = Stream([first, *running])
    assert out.token_ids == script[:12] and out.complete.finish_reason == pb.FINISH_REASON_LENGTH
    stopping.result(timeout=10)


def test_stop_after_grace_cancels_and_aborts(make_env):
    env = make_env(prefill=1, decode=1)
    [decode] = env.by_role("decode")
    decode.token_delay_s = 1.0
    running = env.stub.Generate(text_request(max_tokens=20), timeout=30)
    next(running)
    wait_for(lambda: decode.decodes, what="decode started")
    env.aio.run(env.router.stop(grace_s=0.1))
    with pytest.raises(grpc.RpcError):
        list(running)
    engine_id = decode.decodes[0].request.request_id
    wait_for(lambda: engine_id in decode.aborted, what="decode aborted")


def test_workers_of_another_model_are_ignored(make_env):
    env = make_env(prefill=1, decode=1, worker_options={"model": "some-other-model"}, wait_ready=False)
    err = pytest.raises(grpc.RpcError, env.generate, text_request()).value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert not env.router.pool.workers
