"""The remote KV tier: a prefix evicted from a worker's small KV cache is offloaded to a real Redis and pulled back
with the same greedy output; a corrupted value and a dead Redis both end in a recompute, never a failed request.
Drives real WorkerServers (the default GGUF) over gRPC, no router."""
from __future__ import annotations

import random
import time

import grpc
import pytest
import redis
import torch

from tandem.redis_store import EmbeddedRedis
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc
from tests.workers.test_worker_metrics import scrape, value
from workers.kv_tier import BlockFormatError, BlockLayout, ChecksumError, CostModel, decode_block, encode_block

BLOCK_SIZE = 16
# 24 blocks of the default model (float32, 737,280 bytes each): one 300-token request fills 19 of them, so the
# next one evicts the tail of the one before.
ENGINE = dict(kv_cache_memory_bytes=24 * 737_280, max_model_len=384, block_size=BLOCK_SIZE)
PROMPT_LEN = 300


def prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(PROMPT_LEN)]


def generate(server, token_ids: list[int], request_id: str) -> tuple[list[int], int]:
    """(greedy output ids, prompt tokens the worker had cached)."""
    stub = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(server.info.address))
    req = wpb.EngineRequest(request_id=request_id, prompt_token_ids=token_ids,
                            sampling=pb.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    out, cached = [], None
    for msg in stub.Decode(wpb.DecodeRequest(request=req), timeout=120):
        out.extend(msg.token_ids)
        cached = msg.num_cached_tokens if cached is None else cached
    return out, cached


def wait_until(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def start_worker(redis_url: str):
    from workers.server import WorkerConfig, WorkerServer

    server = WorkerServer(WorkerConfig(engine=ENGINE, torch_threads=1, redis_url=redis_url, kv_offload=True))
    server.start()
    return server


def evict_and_offload(server, a: list[int], b: list[int]) -> list[int]:
    """Serve a (recomputed), then b, whose blocks evict a's tail, and wait for the tail to reach Redis."""
    first, cached = generate(server, a, f"a-{a[0]}")
    assert cached == 0
    pushed = server.kv_tier.stats["pushed_blocks"]
    generate(server, b, f"b-{b[0]}")
    wait_until(lambda: server.kv_tier.stats["pushed_blocks"] > pushed and server.kv_tier._pending_bytes == 0)
    assert server.kv_tier.stats["push_dropped_blocks"] == 0, server.kv_tier.last_error
    assert server.engine.kv.num_cached_prefix_tokens(a) < PROMPT_LEN - BLOCK_SIZE  # a's tail is gone locally
    return first


@pytest.fixture(scope="module")
def worker(redis_server):
    server = start_worker(redis_server.url)
    yield server
    server.stop()


@pytest.mark.slow
def test_an_evicted_prefix_is_pulled_back_with_the_same_greedy_output(worker, redis_url):
    a, b = prompt(1), prompt(2)
    recomputed = evict_and_offload(worker, a, b)
    local = worker.engine.kv.num_cached_prefix_tokens(a)
    hits = worker.kv_tier.stats["hits"]

    pulled, cached = generate(worker, a, "a-again")

    assert pulled == recomputed
    assert worker.kv_tier.stats["hits"] == hits + 1
    # Every full block but the last (its last token is computed for the logits) came from the tier or the cache.
    assert cached == (PROMPT_LEN - 1) // BLOCK_SIZE * BLOCK_SIZE > local
    assert worker.kv_tier.stats["hit_tokens"] >= cached - local
    metrics = scrape(worker)
    assert value(metrics, "tandem_kv_tier_requests_total", result="hit") == worker.kv_tier.stats["hits"]
    assert value(metrics, "tandem_kv_tier_bytes_total", direction="pulled") > 0
    assert value(metrics, "tandem_kv_tier_bytes_total", direction="pushed") > 0
    assert value(metrics, "tandem_kv_tier_pull_latency_seconds_count") == worker.kv_tier.stats["hits"]
    assert value(metrics, "tandem_kv_tier_wait_seconds_count", result="hit") == worker.kv_tier.stats["hits"]


@pytest.mark.slow
def test_a_corrupted_value_is_detected_and_recomputed(worker, redis_url):
    a, b = prompt(3), prompt(4)
    recomputed = evict_and_offload(worker, a, b)
    local = worker.engine.kv.num_cached_prefix_tokens(a)
    # Flip one payload byte of the first block the worker will want from Redis.
    from workers.kv.block_pool import hash_token_blocks
    block_hash = hash_token_blocks(a, BLOCK_SIZE, worker.engine.kv.hash_extra)[local // BLOCK_SIZE]
    key = worker.kv_tier.key(0, block_hash)
    client = redis.Redis.from_url(redis_url)
    stored = bytearray(client.get(key))
    stored[-100] ^= 0x01
    client.set(key, bytes(stored))
    failures = worker.kv_tier.stats["checksum_failures"]

    again, cached = generate(worker, a, "a-corrupt")

    assert again == recomputed
    assert worker.kv_tier.stats["checksum_failures"] == failures + 1
    assert value(scrape(worker), "tandem_kv_tier_checksum_failures_total") == failures + 1
    assert cached == local  # nothing was inserted from the tier
    assert client.get(key) is None  # the bad value is gone, so no other worker pulls it
    client.close()


@pytest.mark.slow
def test_redis_down_means_recompute_and_the_request_is_served():
    server_redis = EmbeddedRedis()
    server_redis.start()
    worker = start_worker(server_redis.url)
    try:
        a, b = prompt(5), prompt(6)
        recomputed = evict_and_offload(worker, a, b)
        server_redis.stop()
        local = worker.engine.kv.num_cached_prefix_tokens(a)

        again, cached = generate(worker, a, "a-down")

        assert again == recomputed
        assert cached == local  # recomputed past the local prefix
        assert worker.kv_tier.stats["errors"] >= 1
        # A dead Redis is found out fast: the request's wait on the tier ends in an error well under 100 ms.
        waits = scrape(worker)
        assert value(waits, "tandem_kv_tier_wait_seconds_count", result="error") == worker.kv_tier.stats["errors"]
        assert value(waits, "tandem_kv_tier_wait_seconds_bucket", result="error", le="0.1") \
            == worker.kv_tier.stats["errors"]
        # Evictions keep coming while Redis is down; they are dropped, not queued without bound.
        generate(worker, b, "b-down")
        assert worker.kv_tier._pending_bytes <= worker.kv_tier.config.max_pending_bytes
    finally:
        worker.stop()
        server_redis.stop()


# --- the value format and the cost model, without a worker --------------------------------------------------------

LAYOUT = BlockLayout(torch.float32, tp_rank=0, tp_size=1, block_size=4, num_layers=2, num_kv_heads=2, head_dim=8)


def test_a_block_value_round_trips_and_refuses_what_is_not_it():
    kv = torch.randn(LAYOUT.shape)
    value = encode_block(LAYOUT, 0xABCDEF, kv)
    assert len(value) == LAYOUT.value_bytes
    assert torch.equal(decode_block(LAYOUT, 0xABCDEF, value), kv)

    flipped = bytearray(value)
    flipped[-1] ^= 0x80
    with pytest.raises(ChecksumError):
        decode_block(LAYOUT, 0xABCDEF, bytes(flipped))
    with pytest.raises(BlockFormatError, match="header"):
        decode_block(LAYOUT, 0x123, value)  # another block's value under this key
    other = BlockLayout(torch.bfloat16, 0, 1, 4, 2, 2, 8)
    with pytest.raises(BlockFormatError, match="header"):
        decode_block(other, 0xABCDEF, value)
    with pytest.raises(BlockFormatError):
        decode_block(LAYOUT, 0xABCDEF, value[:-4])


def test_the_cost_model_pulls_only_when_that_beats_recomputing():
    cost = CostModel(prior_pull_bytes_per_s=1e9, prior_prefill_tokens_per_s=1000.0, prior_rtt_s=0.001)
    assert cost.estimate(num_bytes=10_000_000, num_tokens=1000).pays  # 11 ms against 1 s
    cost.observe_pull(num_bytes=10_000_000, seconds=2.0)  # a slow tier: 5 MB/s measured
    assert not cost.estimate(num_bytes=10_000_000, num_tokens=1000).pays
    cost.observe_prefill(num_computed_tokens=64, seconds=10.0)  # too short to say anything about prefill speed
    assert cost.prefill_tokens_per_s == 1000.0


@pytest.mark.slow
def test_cached_blocks_exported_by_one_engine_and_inserted_into_another_serve_the_same_output():
    """The engine side of the tier, no Redis: read full cached blocks by hash, insert them elsewhere by hash."""
    from workers.kv.block_pool import hash_token_blocks
    from workers.llm import LLM
    from workers.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    a = prompt(7)[:100]  # 6 full blocks and 4 tokens
    with LLM(**ENGINE) as source, LLM(**ENGINE) as target:
        want = source.generate([a], params)[0]
        hashes = hash_token_blocks(a, BLOCK_SIZE, source.engine.kv.hash_extra)
        found, per_rank_kv = source.engine.export_cached_blocks(hashes + [12345])
        assert found == hashes and per_rank_kv[0].shape[2] == len(hashes)

        assert target.engine.insert_cached_blocks(a, 3, [kv[:, :, 3:] for kv in per_rank_kv]) == 0  # no prefix
        assert target.engine.insert_cached_blocks(a, 0, per_rank_kv) == len(hashes)
        got = target.generate([a], params)[0]

    assert got.num_cached_tokens == len(hashes) * BLOCK_SIZE
    assert got.token_ids == want.token_ids
