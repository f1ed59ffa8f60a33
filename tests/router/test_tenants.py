"""API keys, tenants, per-tenant limits and fair admission, over real sockets: the router's gRPC and HTTP fronts
against fake workers (and one real worker for priority scheduling)."""
from __future__ import annotations

import asyncio
import copy
import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from router import RouterConfig
from router.admission import FINISH_MARGIN, Admission
from router.errors import RouterError
from router.tenants import TenancyConfig, parse_tenants, tenancy_from_sources
from tandem.v1 import generation_pb2 as pb
from tests.router.conftest import real_router_env, wait_for
from tests.router.helpers import Stream, text_request
from tests.router.test_openai_http import HTTPClient

KEY_A, KEY_B, KEY_SLOW = "sk-alpha-0123456789", "sk-bravo-9876543210", "sk-slow-5555"
TENANTS = f"""
tenants:
  alpha:
    api_keys: [{KEY_A}]
  bravo:
    api_keys: [{KEY_B}]
    priority: 5
  slow:
    api_keys: [{KEY_SLOW}]
    requests_per_second: 0.5
    tokens_per_minute: 120
"""


def tenancy(text: str = TENANTS) -> TenancyConfig:
    return TenancyConfig(parse_tenants(text, "test"))


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def trailing(e: grpc.RpcError) -> dict:
    return dict(e.trailing_metadata() or ())


@pytest.fixture
def env(make_env):
    return make_env(tenancy=tenancy())


def test_grpc_needs_a_known_key_and_health_stays_open(env):
    e = rpc_error(lambda: env.generate(text_request(max_tokens=3)))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization" in e.details()
    assert dict(e.trailing_metadata())["request-id"].startswith("req-")
    e = rpc_error(lambda: list(env.stub.Generate(text_request(max_tokens=3), metadata=bearer("sk-nope"), timeout=10)))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown API key" in e.details()
    e = rpc_error(lambda: env.stub.ListModels(pb.ListModelsRequest(), timeout=10))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    out = Stream(list(env.stub.Generate(text_request(max_tokens=3), metadata=bearer(KEY_A), timeout=10)))
    assert len(out.token_ids) == 3
    assert env.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(KEY_B), timeout=10).models
    health = health_pb2_grpc.HealthStub(env.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_http_needs_a_bearer_key_and_health_and_metrics_stay_open(env):
    http = HTTPClient(env.router.http_address)
    body = {"prompt": "Hi", "max_tokens": 3}
    status, headers, err = http.json("POST", "/v1/completions", body)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert headers["X-Request-Id"].startswith("req-")
    assert err["error"]["type"] == "AuthenticationError"
    status, headers, _ = http.json("POST", "/v1/completions", body, headers={"Authorization": "Bearer sk-nope"})
    assert status == 401
    status, _, _ = http.json("GET", "/v1/models", headers={"Authorization": f"Basic {KEY_A}"})
    assert status == 401
    status, _, out = http.json("POST", "/v1/completions", body, headers={"Authorization": f"Bearer {KEY_A}"})
    assert status == 200 and out["usage"]["completion_tokens"] == 3
    assert http.request("GET", "/health").status == 200
    http.conn.close()
    assert http.request("GET", "/metrics").status == 200
    http.close()


def test_a_tenant_may_not_ask_for_a_priority_before_its_own(env):
    urgent = pb.GenerateRequest(text="Hi", priority=1, sampling=pb.SamplingParams(max_tokens=3))
    e = rpc_error(lambda: list(env.stub.Generate(urgent, metadata=bearer(KEY_B), timeout=10)))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "priority" in e.details()
    # An explicit 0 is a priority like any other (before the tenant's 5), not "unset".
    zero = pb.GenerateRequest(text="Hi", priority=0, sampling=pb.SamplingParams(max_tokens=3))
    e = rpc_error(lambda: list(env.stub.Generate(zero, metadata=bearer(KEY_B), timeout=10)))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "got 0" in e.details()
    # Its own priority, or a later one, is fine; an unset priority becomes the tenant's.
    for priority in (None, 5, 9):
        req = pb.GenerateRequest(text="Hi", priority=priority, sampling=pb.SamplingParams(max_tokens=2))
        assert Stream(list(env.stub.Generate(req, metadata=bearer(KEY_B), timeout=10))).complete
    prefills = [p.request.priority for w in env.by_role("prefill") for p in w.prefills]
    decodes = [d.request.priority for w in env.by_role("decode") for d in w.decodes]
    assert sorted(set(prefills + decodes)) == [5, 9]
    http = HTTPClient(env.router.http_address)
    for priority in (1, 0):
        status, _, err = http.json("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "priority": priority},
                                   headers={"Authorization": f"Bearer {KEY_B}"})
        assert status == 403 and err["error"]["type"] == "PermissionDeniedError"
    http.close()


def test_requests_per_second_and_tokens_per_minute(env):
    req = text_request("Hi", max_tokens=4)
    assert Stream(list(env.stub.Generate(req, metadata=bearer(KEY_SLOW), timeout=10))).complete
    # Bucket of 1 request, refilled at 0.5/s: the next one right away is refused with a retry-after.
    e = rpc_error(lambda: list(env.stub.Generate(req, metadata=bearer(KEY_SLOW), timeout=10)))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests_per_second=0.5" in e.details()
    assert 1 <= int(trailing(e)["retry-after"]) <= 2
    http = HTTPClient(env.router.http_address)
    status, headers, err = http.json("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 4},
                                     headers={"Authorization": f"Bearer {KEY_SLOW}"})
    assert status == 429 and err["error"]["type"] == "RateLimitError" and int(headers["Retry-After"]) >= 1
    http.close()
    # More tokens than a minute's worth can never pass: refused naming max_tokens, with no retry-after.
    big = text_request("Hi", max_tokens=500)
    e = rpc_error(lambda: list(env.stub.Generate(big, metadata=bearer(KEY_SLOW), timeout=10)))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and e.details().startswith("max_tokens:")
    assert "retry-after" not in trailing(e)
    # Other tenants are not limited by it.
    assert Stream(list(env.stub.Generate(req, metadata=bearer(KEY_A), timeout=10))).complete


def test_unused_tokens_are_refunded(make_env, script):
    text = "tenants:\n  t:\n    api_keys: [sk-t]\n    tokens_per_minute: 100\n"
    env = make_env(tenancy=tenancy(text))
    prompt_len = len(env.model.tokenizer.encode("Hi"))
    # Each reserves 70 of the 100 tokens a minute and uses prompt_len + len(script) (the fake worker's script, 21
    # tokens, ends there):
    # the second fits only because the first gave back what it did not generate; a third does not fit.
    req = text_request("Hi", max_tokens=70 - prompt_len)
    for _ in range(2):
        out = Stream(list(env.stub.Generate(req, metadata=bearer("sk-t"), timeout=10)))
        assert len(out.token_ids) == len(script) == 21
    e = rpc_error(lambda: list(env.stub.Generate(req, metadata=bearer("sk-t"), timeout=10)))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tokens_per_minute=100" in e.details()


def test_fair_share_refuses_the_tenant_over_its_share_first(make_env):
    env = make_env(tenancy=tenancy(), max_queued_requests=4)
    env.by_role("prefill")[0].prefill_delay_s = 30  # every admitted request stays queued on the prefill pool
    calls = [env.stub.Generate(text_request(max_tokens=3), metadata=bearer(KEY_A), timeout=60) for _ in range(4)]
    wait_for(lambda: env.router.admission.num_queued("prefill") == 4, what="alpha fills the queue")
    e = rpc_error(lambda: list(env.stub.Generate(text_request(max_tokens=3), metadata=bearer(KEY_B), timeout=10)))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queued_requests=4" in e.details()
    calls[0].cancel()
    wait_for(lambda: env.router.admission.num_queued("prefill") == 3, what="a slot to free")
    # bravo is waiting too: alpha's share is 4 / 2, it holds 3, so the free slot is bravo's.
    e = rpc_error(lambda: list(env.stub.Generate(text_request(max_tokens=3), metadata=bearer(KEY_A), timeout=10)))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "fair share is 2" in e.details()
    bravo = env.stub.Generate(text_request(max_tokens=3), metadata=bearer(KEY_B), timeout=60)
    wait_for(lambda: env.router.admission.num_queued("prefill") == 4, what="bravo admitted")
    for call in (*calls[1:], bravo):
        call.cancel()


def test_queue_time_estimate_refuses_what_cannot_start_before_its_deadline():
    now = [0.0]
    admission = Admission(("decode",), max_queued=100, max_queue_time_s=0, clock=lambda: now[0])
    for _ in range(3):
        admission.admit(("decode",), "t", time_remaining_s=0.5)  # nothing measured yet: admitted
    for _ in range(3):  # one first token per second while busy
        now[0] += 1.0
        admission.release("decode", "t")
    admission.admit(("decode",), "t")
    now[0] += 1.0
    admission.release("decode", "t")
    # Nothing queued: no wait, whatever was measured, so a pessimistic estimate cannot refuse everything forever.
    assert admission.estimated_wait_s("decode") == 0
    admission.admit(("decode",), "t", time_remaining_s=0.1)
    for _ in range(3):
        admission.admit(("decode",), "t", time_remaining_s=30)
    assert admission.estimated_wait_s("decode") == pytest.approx(5.0)
    # 4 queued, one first token a second: a new request gets its first token in ~5 s.
    with pytest.raises(Exception) as info:
        admission.admit(("decode",), "t", time_remaining_s=2.0)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.retry_after_s == pytest.approx(3.0)
    admission.admit(("decode",), "t", time_remaining_s=6.0)
    assert admission.num_queued("decode") == 5
    now[0] += 3.0  # no first token for 3 s: the pool is slower than measured, seen before its next first token
    assert admission.estimated_wait_s("decode") == pytest.approx(6 * 3.0)
    bounded = Admission(("decode",), max_queued=100, max_queue_time_s=2.0, clock=lambda: now[0])
    bounded._pools = admission._pools  # the same measurements
    with pytest.raises(Exception) as info:
        bounded.admit(("decode",), "t")  # no deadline: max_queue_time_s bounds it
    assert "max_queue_time_s" in str(info.value)


def test_finish_time_estimate_refuses_what_cannot_end_before_its_deadline():
    now = [0.0]
    admission = Admission(("prefill", "decode"), max_queued=100, clock=lambda: now[0])
    for _ in range(4):  # four requests measured: 40 ms per token after the first, 40 tokens each
        admission.record_finished("decode", 40, 0.04)
    pace = 0.04 * FINISH_MARGIN
    assert admission._pools["decode"].decode_s(None) == pytest.approx(39 * pace)
    with pytest.raises(RouterError) as info:
        admission.admit(("prefill", "decode"), "t", time_remaining_s=1.0, max_tokens=32)  # 31 * 50 ms > 1 s
    # Even unqueued it could not finish: no retry helps.
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "more than its deadline" in info.value.message
    assert info.value.retry_after_s is None
    assert admission.num_queued("decode") == 0, "refused: counted nowhere"
    busy = Admission(("decode",), max_queued=100, clock=lambda: now[0])
    busy._pools = {"decode": copy.deepcopy(admission._pools["decode"])}  # the same pace measured
    for t in range(4):  # first tokens from the decode pool 1 s apart
        now[0] = 10.0 + t
        busy.admit(("decode",), "t")
        now[0] = 11.0 + t
        busy.release("decode", "t")
    busy.admit(("decode",), "t")  # one queued: the next waits (1 + 1) * 1 s
    with pytest.raises(RouterError) as info:  # 2 s of waiting + 1.55 s of decoding > 3 s: the load makes it miss
        busy.admit(("decode",), "t", time_remaining_s=3.0, max_tokens=32)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "after its deadline" in info.value.message
    assert info.value.retry_after_s == pytest.approx(2.0 + 31 * pace - 3.0)
    admission.admit(("prefill", "decode"), "t", time_remaining_s=2.0, max_tokens=32)  # 1.55 s fits
    admission.admit(("prefill", "decode"), "t", time_remaining_s=1.0, max_tokens=8)  # a short answer fits
    admission.admit(("prefill", "decode"), "t", max_tokens=1000)  # no deadline: nothing to miss
    # Without max_tokens the measured mean output (40 tokens) is what it is expected to write: 39 * 50 ms > 1.5 s.
    with pytest.raises(RouterError):
        admission.admit(("prefill", "decode"), "t", time_remaining_s=1.5)
    assert admission.num_queued("decode") == 3


def test_keys_never_appear_in_logs_errors_or_config(make_env, caplog):
    secret = "sk-wrong-" + "7" * 24
    caplog.set_level(logging.DEBUG)
    env = make_env(tenancy=tenancy())
    e = rpc_error(lambda: list(env.stub.Generate(text_request(max_tokens=2), metadata=bearer(secret), timeout=10)))
    http = HTTPClient(env.router.http_address)
    _, headers, err = http.json("POST", "/v1/completions", {"prompt": "Hi"},
                                headers={"Authorization": f"Bearer {secret}"})
    Stream(list(env.stub.Generate(text_request(max_tokens=2), metadata=bearer(KEY_A), timeout=10)))
    http.close()
    seen = " ".join([e.details(), str(trailing(e)), str(err), str(headers), caplog.text, repr(env.router.config)])
    for key in (secret, KEY_A, KEY_B, KEY_SLOW):
        assert key not in seen
    with pytest.raises(ValueError) as info:
        parse_tenants(f"tenants:\n  x:\n    api_keys: [{KEY_A}\n", "keys.yaml")  # unclosed list
    assert KEY_A not in str(info.value) and "keys.yaml" in str(info.value)


def test_auth_is_required_off_loopback_unless_disabled(tmp_path):
    RouterConfig(host="127.0.0.1", registry_address="r:1")
    RouterConfig(host="::1", registry_address="r:1")
    with pytest.raises(ValueError, match="--disable-auth"):
        RouterConfig(host="0.0.0.0", registry_address="r:1")
    RouterConfig(host="0.0.0.0", registry_address="r:1", tenancy=TenancyConfig(disable_auth=True))
    path = tmp_path / "keys.json"
    path.write_text('{"tenants": {"a": {"api_keys": ["sk-file"], "priority": 2}}}')
    config = tenancy_from_sources(str(path), None, {"TANDEM_API_KEYS": "tenants: {b: {api_keys: [sk-env]}}",
                                                    "VLLM_API_KEY": "sk-vllm"})
    assert [(t.name, t.priority) for t in config.tenants] == [("a", 2), ("b", 0), ("default", 0)]
    RouterConfig(host="0.0.0.0", registry_address="r:1", tenancy=config)
    with pytest.raises(ValueError, match=r"tenants\.a\.rate: unknown field"):
        parse_tenants("tenants: {a: {api_keys: [k], rate: 3}}", "keys.yaml")


@pytest.mark.slow
def test_a_high_priority_tenant_overtakes_a_low_priority_queue_on_a_real_worker(aio, served_model):
    from tests.servers import ENGINE
    from workers.server import WorkerConfig, WorkerServer

    worker = WorkerServer(WorkerConfig(role="both", engine={**ENGINE, "max_num_seqs": 1,
                                                             "scheduling_policy": "priority"}, torch_threads=1))
    worker.start()
    text = "tenants: {batch: {api_keys: [sk-batch], priority: 10}, live: {api_keys: [sk-live], priority: -10}}"
    env = real_router_env(aio, served_model, [worker], mode="colocated", tenancy=tenancy(text))
    try:
        finished: list[str] = []

        async def run(name: str, key: str) -> None:
            async with grpc.aio.insecure_channel(env.address) as channel:
                from tandem.v1 import generation_pb2_grpc
                stub = generation_pb2_grpc.GenerationStub(channel)
                req = text_request("Count slowly: one, two,", max_tokens=12, ignore_eos=True)
                async for _ in stub.Generate(req, metadata=bearer(key), timeout=120):
                    pass
                finished.append(name)

        batch = [aio.submit(run(f"batch{i}", "sk-batch")) for i in range(3)]
        # One runs (max_num_seqs=1), two wait on the worker, before the high-priority request arrives.
        wait_for(lambda: worker.stats().num_waiting == 2, timeout_s=60, what="two batch requests waiting")
        live = aio.submit(run("live", "sk-live"))
        for f in (*batch, live):
            f.result(120)
        assert finished.index("live") == 1, finished
    finally:
        env.close()
        worker.stop()


def test_auth_off_on_loopback_keeps_the_clients_priority(make_env):
    env = make_env()
    req = pb.GenerateRequest(text="Hi", priority=-3, sampling=pb.SamplingParams(max_tokens=2))
    assert Stream(env.generate(req)).complete
    assert [d.request.priority for d in env.by_role("decode")[0].decodes] == [-3]


def test_a_burst_past_the_queue_time_is_refused_at_once_not_left_to_time_out(make_env):
    env = make_env(max_queue_time_s=0.5)
    env.by_role("prefill")[0].prefill_delay_s = 0.2
    for _ in range(4):  # measured: about one first token per 0.2 s
        assert Stream(env.generate(text_request(max_tokens=2))).complete
    calls = [env.stub.Generate(text_request(max_tokens=2), timeout=30) for _ in range(20)]
    outcomes = []
    for call in calls:
        try:
            outcomes.append(("OK", Stream(list(call)).complete.finish_reason))
        except grpc.RpcError as e:
            outcomes.append((e.code().name, trailing(e).get("retry-after")))
    refused = [o for o in outcomes if o[0] == "RESOURCE_EXHAUSTED"]
    assert refused and all(int(retry_after) >= 1 for _, retry_after in refused)
    assert {code for code, _ in outcomes} <= {"OK", "RESOURCE_EXHAUSTED"}  # none waited out its deadline
    assert any(code == "OK" for code, _ in outcomes)
