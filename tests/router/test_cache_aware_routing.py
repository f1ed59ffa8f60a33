"""Cache-aware routing: the policy on its own (no servers), then a real Router over fake workers whose prefix
caches are described by a PrefixIndex filled with the engine's hashes of the prompts they are sent."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from router.cache.prefix_index import PrefixIndex
from router.config import RouterConfig
from router.policy import (Balance, WorkerLoad, pick_decode_cache_aware, pick_prefill,
                           pick_prefill_cache_aware)
from router.routing import PromptBlocks, match_tokens
from tandem.v1 import generation_pb2 as pb
from tests.router.conftest import wait_for
from tests.router.helpers import Stream
from tests.router.test_tracing import value
from workers.kv.block_pool import hash_token_blocks
from workers.kv.kv_cache_manager import KVCacheManager
from workers.model.loader import resolve_model
from workers.request import Request
from workers.sampling_params import SamplingParams


def load(worker_id, waiting_tokens=0, free_blocks=100, running=0) -> WorkerLoad:
    return WorkerLoad(worker_id, num_waiting_tokens=waiting_tokens, num_free_blocks=free_blocks, num_running=running)


# --- the policy ------------------------------------------------------------------------------------------------


def test_a_cached_prefix_wins_over_a_slightly_busier_worker():
    # a: 96 uncached + 100 queued = 196 tokens ahead of the first token; b: 1000 + 0.
    loads = [load("a", waiting_tokens=100, running=2), load("b")]
    choice = pick_prefill_cache_aware(loads, 1000, {"a": 904})
    assert (choice.worker_id, choice.reason) == ("a", "prefix_hit")
    assert pick_prefill(loads) == "b"  # the load policy ignores the cache


def test_a_holder_with_more_queued_work_than_the_prompt_loses():
    choice = pick_prefill_cache_aware([load("a", waiting_tokens=3000), load("b", waiting_tokens=200)], 1000,
                                      {"a": 960})
    assert (choice.worker_id, choice.reason) == ("b", "load")


def test_the_hot_spot_guard_overrides_the_cache():
    hot = [load("a", running=20), load("b", running=4), load("c", running=12)]
    choice = pick_prefill_cache_aware(hot, 1000, {"a": 992})
    # a has > 8 more requests than b and > 1.5x as many: the load choice among the others (b and c; c has 12 - 4
    # = 8 more, not a hot spot) wins; it is b, with the fewest queued tokens and requests.
    assert (choice.worker_id, choice.reason) == ("b", "hot_spot_guard")
    # Busier, but within either threshold: the cache still wins.
    assert pick_prefill_cache_aware([load("a", running=12), load("b", running=4)], 1000, {"a": 992}).reason \
        == "prefix_hit"
    assert pick_prefill_cache_aware([load("a", running=40), load("b", running=30)], 1000, {"a": 992}).reason \
        == "prefix_hit"
    assert pick_prefill_cache_aware(hot, 1000, {"a": 992}, Balance(abs_threshold=100)).worker_id == "a"


def test_ties_are_spread_and_a_cold_prompt_goes_by_load():
    picks = {pick_prefill_cache_aware([load("a"), load("b")], 500, {"a": 256, "b": 256}).worker_id
             for _ in range(100)}
    assert picks == {"a", "b"}
    cold = pick_prefill_cache_aware([load("a", waiting_tokens=10), load("b")], 500, {})
    assert (cold.worker_id, cold.reason) == ("b", "load")
    assert pick_prefill_cache_aware([], 500, {}) is None


def test_decode_picks_the_worker_holding_the_prompt_blocks():
    choice = pick_decode_cache_aware([load("a", free_blocks=100), load("b", free_blocks=104)], {"a": 60})
    assert (choice.worker_id, choice.reason) == ("a", "prefix_hit")
    # Far more free blocks elsewhere still win: the holder's reuse does not make up for them.
    assert pick_decode_cache_aware([load("a", free_blocks=100), load("b", free_blocks=500)], {"a": 60}).worker_id \
        == "b"
    guarded = pick_decode_cache_aware([load("a", running=30), load("b", running=3)], {"a": 60})
    assert (guarded.worker_id, guarded.reason) == ("b", "hot_spot_guard")


def test_balance_thresholds_are_validated_by_name():
    for field, bad, allowed in (("balance_abs_threshold", -1, ">= 0"), ("balance_rel_threshold", 0.5, ">= 1")):
        with pytest.raises(ValueError) as info:
            RouterConfig(registry_address="h:1", **{field: bad})
        assert str(info.value).startswith(f"{field}:") and allowed in str(info.value)


def test_router_cli_sets_the_routing_options():
    from router.__main__ import parse_config

    config, _ = parse_config(["--registry", "10.0.0.1:7000", "--redis-url", "redis://10.0.0.2:6379",
                              "--routing-policy", "load", "--balance-abs-threshold", "3",
                              "--balance-rel-threshold", "2"])
    assert (config.redis_url, config.routing_policy, config.balance_abs_threshold, config.balance_rel_threshold) \
        == ("redis://10.0.0.2:6379", "load", 3, 2.0)
    assert parse_config(["--registry", "10.0.0.1:7000"])[0].routing_policy == "cache_aware"
    with pytest.raises(SystemExit):
        parse_config(["--registry", "10.0.0.1:7000", "--routing-policy", "random"])


def test_router_hashes_match_what_the_engine_caches_and_reuses(served_model):
    # The engine hashes with its model name (LLMEngine: hash_extra=model_name.encode(), model_name = the source's
    # name, also sent as WorkerInfo.model); the router with the model it serves, which it requires workers to match.
    assert resolve_model(None).name == served_model.name
    kv = KVCacheManager(num_blocks=64, block_size=16, hash_extra=served_model.name.encode())
    first = Request("a", list(range(100, 300)), SamplingParams(max_tokens=1), max_tokens=1)  # 200 tokens
    assert kv.allocate_slots(first, first.num_tokens)
    first.num_computed_tokens = first.num_tokens
    kv.cache_blocks(first)  # 12 full blocks cached
    index = PrefixIndex()
    index.load_snapshot("w", "e", 0, 16, first.block_hashes)
    worker = SimpleNamespace(worker_id="w", info=SimpleNamespace(block_size=16))
    # Prompts sharing the first 200 tokens, of 193..260 tokens: the router predicts what the engine will reuse,
    # which is never the prompt's last token (it computes that one for its logits).
    for n in (193, 200, 201, 208, 209, 260):
        prompt = list(range(100, 100 + min(n, 200))) + list(range(5000, 5000 + max(0, n - 200)))
        reused = len(kv.get_computed_blocks(Request(f"r{n}", prompt, SamplingParams(max_tokens=1), max_tokens=1)))
        assert match_tokens(index, PromptBlocks(prompt, served_model.name), [worker]) == {"w": reused * 16}, n
    assert match_tokens(index, PromptBlocks(list(range(100, 300)), "another-model"), [worker]) == {}


# --- through a router ------------------------------------------------------------------------------------------

PREFIX = list(range(1000, 1000 + 160))  # 10 blocks of 16 tokens: the shared "system prompt"


def prompt(i: int) -> list[int]:
    return PREFIX + [2000 + 10 * i + j for j in range(10)]


def index_holding(env, *workers) -> PrefixIndex:
    """An index in which `workers` hold PREFIX's blocks, hashed as their engines hash them."""
    index = PrefixIndex()
    hashes = hash_token_blocks(PREFIX, 16, env.router.model.name.encode())
    for w in env.workers:
        index.load_snapshot(w.worker_id, "epoch-1", 0, 16, hashes if w in workers else [])
    return index


def generate(env, token_ids: list[int]) -> Stream:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=token_ids),
                                 sampling=pb.SamplingParams(temperature=0.0, max_tokens=3))
    return Stream(env.generate(request))


def set_stats(env, worker, **fields) -> None:
    for name, v in fields.items():
        setattr(worker.stats, name, v)
    handle = env.router.pool.workers[worker.worker_id]
    wait_for(lambda: all(getattr(handle.stats, k) == v for k, v in fields.items()), what="stats polled")


@pytest.mark.parametrize("policy", ["cache_aware", "load"])
def test_requests_sharing_a_prefix_go_where_the_index_says_it_is(make_env, policy):
    env = make_env(prefill=2, decode=2, max_local_prefill_length=0, routing_policy=policy)
    (p0, p1), (d0, d1) = env.by_role("prefill"), env.by_role("decode")
    env.router.pool.prefix_index = index_holding(env, p1, d0)
    # The holders are slightly busier: the load policy picks the others, cache_aware the holders.
    set_stats(env, p1, num_waiting_tokens=50)
    set_stats(env, d0, num_free_blocks=995)
    for i in range(4):
        assert generate(env, prompt(i)).complete.finish_reason == pb.FINISH_REASON_LENGTH
    holders = policy == "cache_aware"
    assert (len(p1.prefills), len(p0.prefills)) == ((4, 0) if holders else (0, 4))
    assert (len(d0.decodes), len(d1.decodes)) == ((4, 0) if holders else (0, 4))

    text, _ = env.router.telemetry.metrics_text()
    reason = "prefix_hit" if holders else "load"
    for pool in ("prefill", "decode"):
        assert value(text, "tandem_router_routing_decisions_total", pool=pool, reason=reason) == 4
    assert value(text, "tandem_router_prefix_cache_prompt_tokens_total", pool="prefill") == 4 * 170
    # The index's prediction (all 10 prefix blocks) against what the (fake) prefill worker reported: 3 per request.
    assert value(text, "tandem_router_prefix_cache_predicted_tokens_total", pool="prefill") == \
        (4 * 160 if holders else 0)
    assert value(text, "tandem_router_prefix_cache_cached_tokens_total", pool="prefill") == 4 * 3


def test_without_an_index_cache_aware_routes_by_load(make_env):
    env = make_env(prefill=2, decode=1, max_local_prefill_length=0)
    p0, p1 = env.by_role("prefill")
    set_stats(env, p1, num_waiting_tokens=50)
    generate(env, prompt(0))
    env.router.pool.prefix_index = PrefixIndex()  # an index that knows none of the workers yet
    generate(env, prompt(1))
    assert (len(p0.prefills), len(p1.prefills)) == (2, 0)
    text, _ = env.router.telemetry.metrics_text()
    assert value(text, "tandem_router_routing_decisions_total", pool="prefill", reason="no_index") == 2


@pytest.mark.parametrize("policy", ["cache_aware", "load"])
def test_conditional_disaggregation_takes_the_uncached_length_from_the_index(make_env, policy):
    # 170-token prompts, 160 of them cached on d0 by the index: 10 uncached < 32, so d0 prefills them itself. The
    # fake workers' MatchPrefix says nothing is cached: the load policy (which asks it) disaggregates.
    env = make_env(prefill=1, decode=2, max_local_prefill_length=32, routing_policy=policy)
    (p0,), (d0, d1) = env.by_role("prefill"), env.by_role("decode")
    env.router.pool.prefix_index = index_holding(env, d0)
    set_stats(env, d0, num_free_blocks=995)
    for i in range(2):
        assert generate(env, prompt(i)).complete.finish_reason == pb.FINISH_REASON_LENGTH
    if policy == "cache_aware":
        assert not p0.prefills and len(d0.decodes) == 2
        assert all(not d.HasField("kv") for d in d0.decodes)
    else:
        assert len(p0.prefills) == 2 and len(d1.decodes) == 2
