"""The global prefix index fed by a real worker (WorkerServer, the default GGUF) through real Redis: the router's
index holds exactly the prefixes the worker caches, a router started later rebuilds it, and with Redis killed the
worker and router keep serving while the index recovers once Redis is back."""
from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.cache.kv_events_follower import FollowerConfig, KVEventsFollower
from tandem.redis_store import EmbeddedRedis
from tandem.v1 import generation_pb2 as pb
from tests.router.conftest import real_router_env, wait_for
from tests.router.helpers import Stream
from tests.servers import ENGINE
from workers.kv.block_pool import hash_token_blocks

pytestmark = pytest.mark.slow

PREFIX = [1000 + (i * 7) % 5000 for i in range(64)]  # 4 blocks shared by every prompt


def prompt(i: int) -> list[int]:
    return PREFIX + [20000 + 13 * i + j for j in range(20 + 9 * i)]


def generate(env, token_ids: list[int]) -> Stream:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=token_ids),
                                 sampling=pb.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    return Stream(env.generate(request, timeout=60))


@pytest.fixture(scope="module")
def redis_server():
    """Its own server: the test kills it and starts another on the same port."""
    server = EmbeddedRedis()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def worker(redis_server):
    from workers.server import WorkerConfig, WorkerServer

    server = WorkerServer(WorkerConfig(role="both", engine=ENGINE, torch_threads=1, redis_url=redis_server.url,
                                       kv_events_interval_s=0.5))
    server.start()
    yield server
    if server.info is not None:
        server.stop()


@pytest.fixture
def env(aio, served_model, worker, redis_server):
    env = real_router_env(aio, served_model, [worker], mode="colocated", redis_url=redis_server.url)
    yield env
    env.close()


def index_matches_worker(index, worker, prompts) -> bool:
    """For every prompt, the leading blocks the index gives the worker are those its prefix cache holds."""
    engine = worker.engine
    for p in prompts:
        hashes = hash_token_blocks(p, engine.block_size, engine.model_name.encode())
        if index.match(hashes).get(worker.worker_id, 0) * engine.block_size != engine.kv.num_cached_prefix_tokens(p):
            return False
    w = index.workers.get(worker.worker_id)
    return w is not None and not w.stale and w.block_hashes == set(engine.kv.pool._cached)


def metrics(address: str) -> dict[str, float]:
    """name{reason=...} -> value of the samples at /metrics (labels other than reason left out)."""
    text = http_get(address, "/metrics")[1].decode()
    return {s.name + (f"{{{s.labels['reason']}}}" if "reason" in s.labels else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def http_get(address: str, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as resp:
        return resp.status, resp.read()


def test_the_routers_index_is_the_workers_prefix_cache_and_a_late_router_rebuilds_it(aio, env, worker, redis_server):
    prompts = [prompt(i) for i in range(3)]
    for p in prompts:
        generate(env, p)
    index = env.router.prefix_index
    wait_for(lambda: index_matches_worker(index, worker, prompts), timeout_s=10, what="the index in sync")
    hashes = hash_token_blocks(prompts[2], 16, worker.engine.model_name.encode())
    assert index.match(hashes)[worker.worker_id] >= len(PREFIX) // 16

    # A router (re)started now: snapshot plus the stream's tail give the same index.
    late = KVEventsFollower(redis_server.url, worker.engine.model_name, lambda: {worker.worker_id: 16},
                            FollowerConfig(block_s=0.1, resync_interval_s=0.2))
    aio.run(late.start())
    try:
        wait_for(lambda: index_matches_worker(late.index, worker, prompts), timeout_s=10, what="the late index")
        assert late.num_snapshots_loaded >= 1
    finally:
        aio.run(late.stop())

    status, body = http_get(env.router.http_address, "/health")
    assert status == 200 and json.loads(body) == {"redis": "up"}
    router_metrics = metrics(env.router.http_address)
    assert router_metrics["tandem_router_prefix_index_blocks"] == index.num_blocks() > 0
    assert router_metrics["tandem_router_prefix_index_workers"] == 1
    assert router_metrics["tandem_router_redis_up"] == 1
    assert router_metrics["tandem_router_kv_events_batches_applied_total"] > 0
    assert router_metrics["tandem_router_kv_events_batches_rejected_total{hash_version}"] == 0
    worker_metrics = metrics(worker.metrics_address)
    assert worker_metrics["tandem_kv_events_published_batches_total"] == worker.kv_events.num_published_batches > 0
    assert worker_metrics["tandem_kv_events_dropped_batches_total"] == 0


def test_with_redis_killed_requests_succeed_and_the_index_recovers(env, worker, redis_server):
    before = [prompt(10)]
    generate(env, before[0])
    index = env.router.prefix_index
    wait_for(lambda: index_matches_worker(index, worker, before), timeout_s=10, what="the index in sync")
    port = redis_server.port
    redis_server.stop()
    try:
        during = [prompt(20 + i) for i in range(2)]
        for p in during:
            assert len(generate(env, p).token_ids) == 4, "served without Redis"
        wait_for(lambda: env.router.redis_state == "down", timeout_s=10, what="the router noticing")
        status, body = http_get(env.router.http_address, "/health")
        assert status == 200 and json.loads(body) == {"redis": "down"}, "Redis down is not unhealthy"
        assert worker.kv_events.num_redis_errors > 0
    finally:
        redis_server.port = port
        redis_server.start()
    wait_for(lambda: env.router.redis_state == "up", timeout_s=10, what="the router reconnecting")
    wait_for(lambda: index_matches_worker(index, worker, before + during), timeout_s=15,
             what="the index recovered, the outage's prefixes included")
