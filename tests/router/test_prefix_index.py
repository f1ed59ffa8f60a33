"""The global prefix index as a data structure: snapshots, ordered batches, gaps, matches."""
from __future__ import annotations

from router.cache.prefix_index import PrefixIndex
from workers.kv.block_pool import hash_token_blocks


def test_match_counts_leading_blocks_per_worker():
    index = PrefixIndex()
    prompt = hash_token_blocks(list(range(64)), 16, b"m")  # 4 blocks
    index.load_snapshot("a", "e1", 0, 16, prompt[:3])
    index.load_snapshot("b", "e1", 0, 16, prompt[:1] + prompt[2:])  # misses block 1: only block 0 counts
    assert index.match(prompt) == {"a": 3, "b": 1}
    assert index.match(prompt, worker_ids=["b"]) == {"b": 1}
    assert index.match(hash_token_blocks(list(range(100, 132)), 16, b"m")) == {}


def test_batches_apply_in_order_and_a_gap_makes_the_worker_stale_until_a_snapshot():
    index = PrefixIndex()
    h = hash_token_blocks(list(range(48)), 16, b"m")
    assert index.apply("a", "e1", 1, stored=h) == "unknown"  # no snapshot yet
    index.load_snapshot("a", "e1", 3, 16, [])
    assert index.apply("a", "e1", 3, stored=h) == "old"
    assert index.apply("a", "e1", 4, stored=h[:2]) == "applied"
    assert index.match(h) == {"a": 2}
    assert index.apply("a", "e1", 5, removed=h[1:2]) == "applied"
    assert index.match(h) == {"a": 1}
    assert index.apply("a", "e1", 7, stored=h) == "gap"
    assert index.match(h) == {}  # stale: not scored
    assert index.apply("a", "e1", 8, stored=h) == "gap"
    index.load_snapshot("a", "e1", 8, 16, h)
    assert index.match(h) == {"a": 3}
    assert index.apply("a", "e1", 9, cleared=True) == "applied"
    assert index.match(h) == {} and index.num_blocks() == 0
    assert index.apply("a", "e2", 10, stored=h) == "unknown"  # a new engine start needs its own snapshot


def test_remove_worker_drops_its_entries_only():
    index = PrefixIndex()
    h = hash_token_blocks(list(range(32)), 16, b"m")
    index.load_snapshot("a", "e", 0, 16, h)
    index.load_snapshot("b", "e", 0, 16, h)
    index.remove_worker("a")
    assert index.match(h) == {"b": 2}
    assert index.num_blocks("a") == 0 and index.num_blocks("b") == 2
