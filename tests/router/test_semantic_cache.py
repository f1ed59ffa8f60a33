"""The semantic response cache through a real Router (fake workers, real Redis, real all-MiniLM-L6-v2): hits on
both fronts with no worker touched, hard negatives that miss, tenants that never see each other's answers,
refusals by name, entries shared between routers through Redis, and a dead Redis that fails no request."""
from __future__ import annotations

import time

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.cache.semantic import SemanticCacheConfig
from router.tenants import TenancyConfig, Tenant, hash_key
from tandem.redis_store import EmbeddedRedis
from tandem.v1 import generation_pb2 as pb
from tests.router.conftest import SCRIPT_TEXT, wait_for
from tests.router.helpers import Stream
from tests.router.test_openai_http import HTTPClient

QUESTION = "How do I reverse a list in Python?"
PARAPHRASE = "What's the way to reverse a Python list?"
NEGATIVE = "How do I reverse a list in Ruby?"
FAST_SYNC = SemanticCacheConfig(poll_interval_s=0.05)


@pytest.fixture
def cache_env(make_env, redis_url):
    clients: list[HTTPClient] = []

    def make(url: str = redis_url, **config):
        env = make_env(http_port=0, redis_url=url, semantic_cache=config.pop("semantic_cache", FAST_SYNC), **config)
        env.http = HTTPClient(env.router.http_address)
        clients.append(env.http)
        if url == redis_url:
            wait_for(lambda: env.router.semantic_cache.ready, 60, "the model and the rebuild")
        return env

    yield make
    for c in clients:
        c.close()


def worker_calls(env) -> int:
    return sum(len(w.prefills) + len(w.decodes) for w in env.workers)


def ask(env, prompt: str, headers: dict | None = None, **body):
    status, resp_headers, out = env.http.json(
        "POST", "/v1/completions",
        {"prompt": prompt, "temperature": 0, "max_tokens": 32, "semantic_cache": True, **body}, headers=headers)
    assert status == 200, out
    return resp_headers, out


def test_a_paraphrase_is_answered_from_the_cache_on_both_fronts_without_a_worker(cache_env):
    env = cache_env()
    headers, first = ask(env, QUESTION)
    assert headers["X-Semantic-Cache"] == "miss" and first["usage"]["semantic_cache_hit"] is False
    assert first["choices"][0]["text"] == SCRIPT_TEXT
    calls = worker_calls(env)

    # Streamed, opted in by header: the same answer, marked, and no worker call.
    resp, events = env.http.events("/v1/completions", {
        "prompt": PARAPHRASE, "temperature": 0, "max_tokens": 32, "stream": True,
        "stream_options": {"include_usage": True}}, headers={"X-Semantic-Cache": "on"})
    assert resp.status == 200 and resp.getheader("X-Semantic-Cache") == "hit"
    assert "".join(e["choices"][0]["text"] for e in events[:-1] if e != "[DONE]" and e["choices"]) == SCRIPT_TEXT
    assert events[-2]["usage"]["semantic_cache_hit"] is True
    assert events[-2]["usage"]["completion_tokens"] == first["usage"]["completion_tokens"]
    assert worker_calls(env) == calls

    # gRPC: its own entries (another endpoint's parameters), the same rules.
    request = pb.GenerateRequest(text=QUESTION, semantic_cache=True,
                                 sampling=pb.SamplingParams(temperature=0.0, max_tokens=32))
    miss = Stream(env.generate(request))
    assert not miss.complete.usage.semantic_cache_hit and miss.text == SCRIPT_TEXT
    calls = worker_calls(env)
    request.text = PARAPHRASE
    hit = Stream(env.generate(request))
    assert hit.complete.usage.semantic_cache_hit and hit.complete.finish_reason == pb.FINISH_REASON_STOP
    assert hit.text == SCRIPT_TEXT and hit.token_ids == miss.token_ids
    assert worker_calls(env) == calls


def test_a_near_duplicate_that_means_something_else_goes_to_a_worker(cache_env):
    env = cache_env()
    ask(env, QUESTION)
    calls = worker_calls(env)
    headers, out = ask(env, NEGATIVE)
    assert headers["X-Semantic-Cache"] == "miss" and out["usage"]["semantic_cache_hit"] is False
    assert worker_calls(env) > calls
    # Other parameters are other entries: max_tokens differs.
    calls = worker_calls(env)
    headers, _ = ask(env, QUESTION, max_tokens=8)
    assert headers["X-Semantic-Cache"] == "miss" and worker_calls(env) > calls


def test_tenant_a_entries_are_never_served_to_tenant_b(cache_env):
    tenancy = TenancyConfig((Tenant("team-a", (hash_key("sk-a"),)), Tenant("team-b", (hash_key("sk-b"),))))
    env = cache_env(tenancy=tenancy)
    key_a, key_b = {"Authorization": "Bearer sk-a"}, {"Authorization": "Bearer sk-b"}
    ask(env, QUESTION, headers=key_a)
    calls = worker_calls(env)
    headers, out = ask(env, PARAPHRASE, headers=key_b)  # tenant b's first question: a's entry is not b's
    assert headers["X-Semantic-Cache"] == "miss" and out["usage"]["semantic_cache_hit"] is False
    assert worker_calls(env) > calls
    assert env.router.semantic_cache.index.num_entries("team-b") == 1
    headers, _ = ask(env, PARAPHRASE, headers=key_a)
    assert headers["X-Semantic-Cache"] == "hit"
    # With API keys, X-Tenant-Id cannot reach another tenant's entries.
    status, _, out = env.http.json("POST", "/v1/completions",
                                   {"prompt": QUESTION, "temperature": 0, "semantic_cache": True},
                                   headers={**key_b, "X-Tenant-Id": "team-a"})
    assert status == 403 and out["error"]["message"].startswith("X-Tenant-Id:")
    # gRPC: the identical question from tenant b's key is a miss too.
    request = pb.GenerateRequest(text=NEGATIVE, semantic_cache=True,
                                 sampling=pb.SamplingParams(temperature=0.0, max_tokens=32))
    Stream(list(env.stub.Generate(request, metadata=(("authorization", "Bearer sk-a"),), timeout=10)))
    calls = worker_calls(env)
    stream = Stream(list(env.stub.Generate(request, metadata=(("authorization", "Bearer sk-b"),), timeout=10)))
    assert not stream.complete.usage.semantic_cache_hit and worker_calls(env) > calls


def test_without_auth_the_tenant_id_header_scopes_the_entries(cache_env):
    env = cache_env()
    ask(env, QUESTION, headers={"X-Tenant-Id": "acme"})
    headers, _ = ask(env, PARAPHRASE, headers={"X-Tenant-Id": "globex"})
    assert headers["X-Semantic-Cache"] == "miss"
    headers, _ = ask(env, PARAPHRASE)  # the tenant "default"
    assert headers["X-Semantic-Cache"] == "miss"
    headers, _ = ask(env, PARAPHRASE, headers={"X-Tenant-Id": "acme"})
    assert headers["X-Semantic-Cache"] == "hit"
    request = pb.GenerateRequest(text=QUESTION, semantic_cache=True,
                                 sampling=pb.SamplingParams(temperature=0.0, max_tokens=32))
    Stream(list(env.stub.Generate(request, metadata=(("x-tenant-id", "initech"),), timeout=10)))
    request.text = PARAPHRASE
    assert Stream(list(env.stub.Generate(request, metadata=(("x-tenant-id", "initech"),),
                                         timeout=10))).complete.usage.semantic_cache_hit
    assert not Stream(env.generate(request)).complete.usage.semantic_cache_hit


@pytest.mark.parametrize("body, headers, field", [
    ({"temperature": 0.7}, {}, "semantic_cache: only deterministic requests"),
    ({"logprobs": 2}, {}, "semantic_cache: cannot be combined with logprobs"),
    ({"prompt": [1, 2, 3]}, {}, "semantic_cache: needs the prompt as text"),
    ({"semantic_cache": "yes"}, {}, "semantic_cache: must be a boolean"),
    ({"semantic_cache": None}, {"X-Semantic-Cache": "maybe"}, "X-Semantic-Cache: must be 'on' or 'off'"),
    ({}, {"X-Tenant-Id": "a b"}, "X-Tenant-Id: must be"),
])
def test_opt_ins_that_cannot_be_honoured_are_refused_by_name(cache_env, body, headers, field):
    env = cache_env()
    status, _, out = env.http.json("POST", "/v1/completions",
                                   {"prompt": QUESTION, "temperature": 0, "semantic_cache": True, **body},
                                   headers=headers)
    assert status == 400 and out["error"]["message"].startswith(field), out
    assert worker_calls(env) == 0


def test_a_seeded_request_may_opt_in_and_the_switch_off_refuses(cache_env, make_env):
    env = cache_env()
    headers, _ = ask(env, QUESTION, temperature=0.7, seed=7)
    assert headers["X-Semantic-Cache"] == "miss"
    assert ask(env, PARAPHRASE, temperature=0.7, seed=7)[0]["X-Semantic-Cache"] == "hit"
    assert ask(env, PARAPHRASE, temperature=0.7, seed=8)[0]["X-Semantic-Cache"] == "miss"

    off = make_env(http_port=0)
    client = HTTPClient(off.router.http_address)
    status, _, out = client.json("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": QUESTION}], "temperature": 0, "semantic_cache": True})
    client.close()
    assert status == 400 and out["error"]["message"].startswith("semantic_cache: the semantic cache is off")
    with pytest.raises(grpc.RpcError) as e:
        off.generate(pb.GenerateRequest(text=QUESTION, semantic_cache=True, sampling=pb.SamplingParams(temperature=0)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("semantic_cache:")


def test_chat_hits_need_the_same_conversation_before_the_last_message(cache_env):
    env = cache_env()

    def chat(messages):
        status, headers, out = env.http.json("POST", "/v1/chat/completions", {
            "messages": messages, "temperature": 0, "max_tokens": 32, "semantic_cache": True})
        assert status == 200, out
        return headers["X-Semantic-Cache"]

    system = {"role": "system", "content": "You are a terse assistant."}
    assert chat([system, {"role": "user", "content": QUESTION}]) == "miss"
    assert chat([system, {"role": "user", "content": PARAPHRASE}]) == "hit"
    assert chat([{"role": "user", "content": PARAPHRASE}]) == "miss"  # another system prompt


def test_other_routers_and_a_restarted_one_get_the_entries_through_redis(cache_env):
    first = cache_env()
    ask(first, QUESTION)
    second = cache_env()  # rebuilt from Redis at start
    assert second.router.semantic_cache.index.num_entries() == 1
    assert ask(second, PARAPHRASE)[0]["X-Semantic-Cache"] == "hit"
    # Written after both started: the first router follows the second's writes.
    ask(second, NEGATIVE)
    wait_for(lambda: first.router.semantic_cache.index.num_entries() == 2, 10, "the stream")
    calls = worker_calls(first)
    assert ask(first, "How can I reverse a list in Ruby?")[0]["X-Semantic-Cache"] == "hit"
    assert worker_calls(first) == calls


def test_redis_down_requests_are_served_and_the_cache_goes_on_locally(cache_env):
    redis = EmbeddedRedis()
    url = redis.start()
    try:
        env = cache_env(url)
        wait_for(lambda: env.router.semantic_cache.ready, 60, "the model and the rebuild")
    finally:
        redis.stop()
    headers, out = ask(env, QUESTION)
    assert headers["X-Semantic-Cache"] == "miss" and out["choices"][0]["text"] == SCRIPT_TEXT
    headers, out = ask(env, PARAPHRASE)
    assert headers["X-Semantic-Cache"] == "hit" and out["choices"][0]["text"] == SCRIPT_TEXT
    text = env.http.request("GET", "/metrics").read().decode()
    assert metric(text, "tandem_router_semantic_cache_stores_total", status="redis_unavailable") >= 1
    assert metric(text, "tandem_router_semantic_cache_lookups_total", result="hit") >= 1
    assert metric(text, "tandem_router_semantic_cache_entries") == 1
    assert metric(text, "tandem_router_semantic_cache_tenants") == 1


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_the_deployment_switch_is_validated_by_name():
    import argparse

    from router import RouterConfig
    from router.cache.semantic.config import add_semantic_cache_arguments, semantic_cache_from_args

    with pytest.raises(ValueError, match="^semantic_cache: needs redis_url"):
        RouterConfig(registry_address="127.0.0.1:1", semantic_cache=SemanticCacheConfig())
    with pytest.raises(ValueError, match=r"^semantic_cache.similarity_threshold: must be in \(0, 1\]"):
        SemanticCacheConfig(similarity_threshold=1.5)
    parser = argparse.ArgumentParser()
    add_semantic_cache_arguments(parser)
    assert semantic_cache_from_args(parser.parse_args([])) is None  # off by default
    config = semantic_cache_from_args(parser.parse_args(["--semantic-cache", "--semantic-cache-threshold", "0.9"]))
    assert config == SemanticCacheConfig(similarity_threshold=0.9)
    assert semantic_cache_from_args(parser.parse_args(["--semantic-cache"])) == SemanticCacheConfig()
    # Not silently ignored with the cache off; a bad value is named by its flag.
    with pytest.raises(ValueError, match="^--semantic-cache-threshold: needs --semantic-cache"):
        semantic_cache_from_args(parser.parse_args(["--semantic-cache-threshold", "0.9"]))
    with pytest.raises(ValueError, match=r"^--semantic-cache-threshold: must be in \(0, 1\], got 1.5"):
        semantic_cache_from_args(parser.parse_args(["--semantic-cache", "--semantic-cache-threshold", "1.5"]))


def test_after_redis_returns_answers_are_written_there_again(cache_env):
    import redis as redis_py

    server = EmbeddedRedis()
    url = server.start()
    try:
        env = cache_env(url)
        wait_for(lambda: env.router.semantic_cache.ready, 60, "the model and the rebuild")
        server.stop()
        assert ask(env, QUESTION)[0]["X-Semantic-Cache"] == "miss"  # served; kept in this router only
        server.start()  # the same port, empty
        client = redis_py.Redis.from_url(url)

        def stored_in_redis() -> bool:
            # Each answer is a new entry: ask new questions until one reaches Redis (the breaker's probe first).
            ask(env, f"{NEGATIVE} Version {time.monotonic_ns()}.")
            return bool(client.keys("tandem:semcache:*"))

        wait_for(stored_in_redis, 10, "a write to the restarted redis")
        client.close()
    finally:
        server.stop()
