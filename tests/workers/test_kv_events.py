"""KV cache events: replayed in order they give exactly what the prefix cache holds, through prefix reuse,
eviction, a cache reset, KV imported by a decode engine, and an undrained log that overflows."""
import dataclasses

import pytest

from workers import LLM, SamplingParams
from workers.engine import LLMEngine
from workers.kv.block_pool import BlockPool, hash_token_blocks
from workers.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, replay

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def tokens(n: int, start: int) -> list[int]:
    return [start + (i * 7) % 5000 for i in range(n)]


def cached_hashes(engine: LLMEngine) -> set[int]:
    return set(engine.kv.pool._cached)


def leading_blocks(hashes: set[int], engine: LLMEngine, prompt: list[int]) -> int:
    n = 0
    for h in hash_token_blocks(prompt, engine.block_size, engine.model_name.encode()):
        if h not in hashes:
            break
        n += 1
    return n


@pytest.fixture(scope="module")
def small_llm():
    # 25 blocks of the default model in float32 (400 tokens): a few prompts of 100-200 tokens force evictions.
    with LLM(kv_cache_memory_bytes=18 << 20, enable_kv_cache_events=True) as llm:
        yield llm


def test_events_replay_to_the_cached_prefix_through_reuse_eviction_and_reset(small_llm):
    engine = small_llm.engine
    index: set[int] = set()
    prefix = tokens(96, start=1000)
    a = prefix + tokens(40, start=3000)
    small_llm.generate([a], GREEDY)
    events = engine.take_kv_events()
    assert events and all(isinstance(e, BlockStored) for e in events), "a first prompt only stores blocks"
    replay(events, index)
    assert index == cached_hashes(engine)
    assert leading_blocks(index, engine, a) * engine.block_size == engine.kv.num_cached_prefix_tokens(a) > 0

    # Same prefix: its blocks are reused, not stored again.
    b = prefix + tokens(40, start=4000)
    (out,) = small_llm.generate([b], GREEDY)
    assert out.num_cached_tokens == 96
    events = engine.take_kv_events()
    stored = [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]
    assert not set(stored) & set(hash_token_blocks(prefix, 16, engine.model_name.encode())), \
        "reused prefix blocks are not announced twice"
    replay(events, index)
    assert index == cached_hashes(engine)

    # Unrelated long prompts evict the LRU blocks: the removals are announced.
    for start in (6000, 7000, 8000, 9000):
        small_llm.generate([tokens(200, start=start)], GREEDY)
    events = engine.take_kv_events()
    removed = [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert removed and engine.kv.pool.num_evictions > 0
    replay(events, index)
    assert index == cached_hashes(engine)
    for prompt in (a, b):
        assert leading_blocks(index, engine, prompt) * engine.block_size == engine.kv.num_cached_prefix_tokens(prompt)

    engine.kv.pool.reset_prefix_cache()
    events = engine.take_kv_events()
    assert events == [AllBlocksCleared()]
    assert replay(events, index) == set() == cached_hashes(engine)
    assert engine.take_kv_events() == [], "taking drains the log"


def test_offline_engines_record_nothing():
    pool = BlockPool(4)
    (block,) = pool.allocate(1)
    pool.cache_block(block, 7)
    assert pool.events is None and pool.take_events() == []


def test_an_undrained_log_stays_bounded_and_still_replays_to_the_cache():
    pool = BlockPool(4, enable_kv_cache_events=True)
    limit = pool.events.max_pending_hashes
    h = 0
    for _ in range(limit):  # far more changes than the pool has blocks
        blocks = pool.allocate(4)
        for block in blocks:
            h += 1
            pool.cache_block(block, h)
        pool.free(blocks)
    events = pool.take_events()
    assert sum(len(getattr(e, "block_hashes", ())) for e in events) <= limit
    assert pool.events.num_compactions > 0
    assert replay(events) == set(pool._cached) == {h - 3, h - 2, h - 1, h}


def test_kv_imported_from_a_prefill_engine_is_announced(small_llm):
    config = small_llm.engine.config
    prefill = LLMEngine(dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, role="prefill")))
    decode = small_llm.engine  # imports as a decode (or both) worker does
    decode.kv.pool.reset_prefix_cache()
    decode.take_kv_events()
    try:
        prompt = tokens(100, start=12000)
        req_id = prefill.add_request(prompt, GREEDY)
        while not prefill.step():
            pass
        decode.import_kv(prefill.export_kv(req_id), GREEDY, req_id)
        prefill.release_kv(req_id)
        index = replay(decode.take_kv_events())
        assert index == cached_hashes(decode)
        assert leading_blocks(index, decode, prompt) == 100 // 16, "every full prompt block imported is indexed"
        assert decode.kv.num_cached_prefix_tokens(prompt) == 96
        while decode.has_unfinished_requests():
            decode.step()
        replay(decode.take_kv_events(), index)
        assert index == cached_hashes(decode)
    finally:
        prefill.shutdown()
