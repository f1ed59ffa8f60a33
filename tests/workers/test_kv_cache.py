"""Block pool and KV cache manager, with no model."""
import pytest

from workers.kv.block_pool import BlockPool, hash_token_blocks
from workers.kv.kv_cache_manager import KVCacheManager
from workers.request import Request
from workers.sampling_params import SamplingParams


def make_request(req_id: str, prompt: list[int]) -> Request:
    return Request(req_id, prompt, SamplingParams(max_tokens=8), max_tokens=8)


def test_chained_hash_depends_on_every_earlier_token():
    a = hash_token_blocks(list(range(48)), 16)
    b = hash_token_blocks([99] + list(range(1, 48)), 16)
    assert len(a) == 3
    assert all(x != y for x, y in zip(a, b)), "a change in block 0 must change every later block's hash"
    assert hash_token_blocks(list(range(48)), 16) == a, "hashes are deterministic"
    assert hash_token_blocks(list(range(40)), 16) == a[:2], "only full blocks are hashed"


def test_pool_refcounts_and_free_list():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert pool.num_free_blocks == 1 and all(b.ref_cnt == 1 for b in blocks)
    pool.take(blocks[:1])
    pool.free(blocks)
    assert blocks[0].ref_cnt == 1 and pool.num_free_blocks == 3
    with pytest.raises(RuntimeError, match="need 4 blocks"):
        pool.allocate(4)


def test_freed_cached_blocks_are_evicted_lru():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache_block(a, 111)
    pool.cache_block(b, 222)
    pool.free([a])  # a freed first: the oldest, so the first to go
    pool.free([b])
    assert pool.lookup(111) is a and pool.lookup(222) is b, "freed blocks stay cached"
    (c,) = pool.allocate(1)
    assert c is a and pool.lookup(111) is None and pool.lookup(222) is b


def test_cached_tokens_of_a_waiting_request_are_what_its_scheduling_would_hit():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = make_request("a", list(range(10)))
    assert kv.allocate_slots(first, 10)
    first.num_computed_tokens = 10
    kv.cache_blocks(first)
    kv.free(first)
    waiting = make_request("b", list(range(12)) + [99])  # 3 full blocks; the first 2 are cached
    assert kv.num_cached_tokens_of(waiting) == 8 == 4 * len(kv.get_computed_blocks(waiting))
    assert kv.num_cached_tokens_of(make_request("c", list(range(8)))) == 4  # the last token is always computed
    assert kv.num_cached_tokens_of(make_request("d", [7] + list(range(1, 12)))) == 0
    assert KVCacheManager(16, 4, enable_prefix_caching=False).num_cached_tokens_of(waiting) == 0


def test_prefix_hit_reuses_blocks_and_leaves_last_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = make_request("a", list(range(10)))
    assert kv.allocate_slots(first, 10)
    first.num_computed_tokens = 10
    kv.cache_blocks(first)  # blocks 0 and 1 are full
    kv.free(first)
    same = make_request("b", list(range(10)))
    hits = kv.get_computed_blocks(same)
    assert len(hits) == 2, "both full blocks of the 10-token prompt hit"
    exact = make_request("c", list(range(8)))
    # 8 tokens = 2 full blocks, but one token must be computed for logits: only 1 block may hit.
    assert len(kv.get_computed_blocks(exact)) == 1


def test_allocate_fails_cleanly_when_blocks_run_out():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    req = make_request("a", list(range(12)))
    assert not kv.allocate_slots(req, 12)
    assert kv.num_free_blocks == 2 and kv.block_ids("a") == []
    assert kv.allocate_slots(req, 8)
    assert len(kv.block_ids("a")) == 2


def test_shared_prefix_blocks_are_refcounted():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(9)))
    kv.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    kv.cache_blocks(a)
    b = make_request("b", list(range(8)) + [42])
    hits = kv.get_computed_blocks(b)
    assert len(hits) == 2
    assert kv.allocate_slots(b, 1, hits)
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    kv.free(a)
    assert all(blk.ref_cnt == 1 for blk in hits), "b still holds the shared blocks"
    kv.free(b)
    assert kv.num_free_blocks == 8


def test_decode_buckets_cut_where_lengths_jump():
    from workers.model.backends.sdpa import split_by_length

    assert split_by_length([10] * 5 + [500] * 5) == [5, 10]
    assert split_by_length([5, 6, 7]) == [3], "tiny savings are not worth another call"
    ends = split_by_length(sorted([100, 300, 500, 700] * 16), max_groups=4)
    assert ends == [16, 32, 48, 64]
