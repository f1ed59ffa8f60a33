"""The semantic cache's parts without a router: the guards, the index with real all-MiniLM-L6-v2 embeddings, and
the Redis side (cap, rebuild) against a real server."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from router.cache.semantic import CacheEntry, SemanticCache, SemanticCacheConfig, SemanticIndex, conflict
from router.cache.semantic.embedder import EMBEDDING_DIM, Embedder

THRESHOLD = SemanticCacheConfig.similarity_threshold


@pytest.mark.parametrize("a, b, guard", [
    ("What is 15% of 80?", "What is 15% of 90?", "numbers"),
    ("Give me three tips for better sleep.", "Give me 5 tips for better sleep.", "numbers"),
    ("How many cups are in a liter?", "How many cups are in a gallon?", "units"),
    ("Is 25 euros a good price for a haircut?", "Is 25 dollars a good price for a haircut?", "units"),
    ("Which foods contain gluten?", "Which foods do not contain gluten?", "negation"),
    ("How do I make bread with yeast?", "How do I make bread without yeast?", "negation"),
    ("What is the capital of France?", "What is the capital of Germany?", "entities"),
    ("what is the capital of france?", "what is the capital of italy?", "entities"),
    ("Can a cat get fleas from a dog?", "Can a dog get fleas from a cat?", "roles"),
    ("Convert 10 miles to kilometers.", "Convert 10 kilometers to miles.", "roles"),
    ("Cheap flights from London to Paris this week", "Any cheap flights from Paris to London this week?", "order"),
    ("Should I stretch before lifting weights?", "Should I stretch after lifting weights?", "antonyms"),
    ("How do I enable JavaScript in Chrome?", "How do I disable JavaScript in Chrome?", "antonyms"),
    ("How do I zip a folder on a Mac?", "How do I unzip a folder on a Mac?", "antonyms"),
    ("What does os.path.join do?", "What does os.path.split do?", "verbatim"),
])
def test_guards_tell_near_duplicates_apart_by_name(a, b, guard):
    assert conflict(a, b) == guard
    assert conflict(b, a) == guard


@pytest.mark.parametrize("a, b", [
    ("How do I reverse a list in Python?", "What's the way to reverse a Python list?"),
    ("How many countries are there in Africa?", "How many African countries are there?"),
    ("What is 15% of 80?", "How much is 15 percent of 80?"),
    ("What is the longest river in the world?", "Which river is the longest on Earth?"),
    ("How long should I boil an egg?", "How many minutes should I boil an egg?"),
])
def test_guards_let_paraphrases_through(a, b):
    assert conflict(a, b) is None


@pytest.fixture(scope="module")
def embedder():
    return Embedder()


def entry(embedder, text: str, tenant: str = "a", params_key: str = "p", created_at: float = 0.0,
          ttl_s: float = 3600.0, entry_id: str | None = None) -> CacheEntry:
    return CacheEntry(entry_id or text, tenant, params_key, text, embedder.embed([text])[0], (1, 2, 3), "answer",
                      "stop", 7, created_at, created_at + ttl_s)


def test_embeddings_are_normalized_and_the_fast_path_matches_the_eager_model(embedder):
    texts = ["How do I reverse a list in Python?", "What's the way to reverse a Python list?",
             "How do I bake sourdough bread?"]
    vectors = embedder.embed(texts)
    assert vectors.shape == (3, EMBEDDING_DIM) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    sims = vectors @ vectors.T
    assert sims[0, 1] > THRESHOLD > sims[0, 2]
    # A text embedded alone or in a padded batch, traced or eager: the same vector.
    eager = Embedder(trace=False)
    assert np.allclose(eager.embed(texts), vectors, atol=1e-5)
    assert np.allclose(embedder.embed(texts[2:]), vectors[2:], atol=1e-5)


def test_index_answers_paraphrases_of_the_same_tenant_and_parameters_only(embedder):
    index = SemanticIndex(max_entries_per_tenant=100)
    stored = entry(embedder, "How do I reverse a list in Python?")
    index.add(stored)
    query = "What's the way to reverse a Python list?"
    vector = embedder.embed([query])[0]
    assert index.lookup("a", "p", query, vector, THRESHOLD, now=1.0).entry is stored
    assert index.lookup("b", "p", query, vector, THRESHOLD, now=1.0).entry is None  # another tenant
    assert index.lookup("a", "q", query, vector, THRESHOLD, now=1.0).entry is None  # other parameters
    assert index.lookup("a", "p", query, vector, THRESHOLD, now=3601.0).entry is None  # expired
    negative = "How do I reverse a list in Ruby?"
    match = index.lookup("a", "p", negative, embedder.embed([negative])[0], THRESHOLD, now=1.0)
    assert match.entry is None and match.rejected_by == "entities" and match.similarity >= THRESHOLD
    # The same text (case and spaces aside) needs no embedding.
    assert index.lookup("a", "p", "how do I  reverse a list in python?", None, THRESHOLD, now=1.0).entry is stored


def test_index_keeps_each_tenant_and_the_total_under_their_caps_oldest_first(embedder):
    index = SemanticIndex(max_entries_per_tenant=2, max_entries=3)
    texts = ["What is photosynthesis?", "Why is the sky blue?", "How do magnets work?"]
    evicted = [index.add(entry(embedder, t, created_at=i)) for i, t in enumerate(texts)]
    assert [e.prompt_text for e in evicted[2]] == ["What is photosynthesis?"]
    assert ("a", "What is photosynthesis?") not in index
    evicted = index.add(entry(embedder, "What is DNA?", tenant="b"))
    evicted += index.add(entry(embedder, "What is RNA?", tenant="c"))
    assert [e.prompt_text for e in evicted] == ["Why is the sky blue?"]  # the oldest of all tenants
    assert index.num_entries("a") == 1 and index.num_entries("b") == 1 and index.num_entries() == 3


def test_redis_holds_the_entries_a_new_cache_rebuilds_and_the_cap_trims(redis_url, embedder):
    async def scenario():
        config = SemanticCacheConfig(max_entries_per_tenant=2, poll_interval_s=0.05)
        first = SemanticCache(config, redis_url, "org/model:v1")
        texts = ["What is photosynthesis?", "Why is the sky blue?", "How do magnets work?"]
        for i, t in enumerate(texts):
            await first._write(entry(embedder, t, tenant="team:a", entry_id=f"e{i}", created_at=1000.0 + i))
        await first._write(entry(embedder, "What is DNA?", tenant="team", entry_id="dna", created_at=1000.0))
        second = SemanticCache(config, redis_url, "org/model:v1")
        await second._rebuild()
        by_tenant = {t: second.index.num_entries(t) for t in second.index.tenants}
        # A tenant named "team" never reads "team:a"'s keys (names are percent-encoded in keys).
        assert by_tenant == {"team:a": 2, "team": 1}
        assert ("team:a", "e0") not in second.index  # the oldest went past the cap
        query = "What makes the sky look blue?"
        match = second.index.lookup("team:a", "p", query, embedder.embed([query])[0], THRESHOLD, now=1001.0)
        assert match.entry is not None and match.entry.entry_id == "e1" and match.entry.token_ids == (1, 2, 3)
        for cache in (first, second):
            await cache.store.close()

    asyncio.run(scenario())



def test_a_huge_text_is_cut_before_tokenization(embedder):
    """Only the first MAX_SEQ_LEN tokens count; a 4 MB prompt is cut to MAX_TEXT_CHARS characters first, so it
    embeds like that cut (and in about the time of a short one, instead of holding the embedding thread)."""
    from router.cache.semantic.embedder import MAX_TEXT_CHARS

    huge = "What is the capital of France? " * ((4 << 20) // 31)
    assert len(huge) > 100 * MAX_TEXT_CHARS
    assert np.allclose(embedder.embed([huge]), embedder.embed([huge[:MAX_TEXT_CHARS]]), atol=1e-5)
