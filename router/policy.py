"""Which worker gets a request: pure functions over load records, so they can be tested without servers.

Two policies (`RouterConfig.routing_policy`):
  load         `pick_prefill` / `pick_decode`: queued prompt tokens, free KV blocks, requests; no prefix index.
  cache_aware  `pick_prefill_cache_aware` / `pick_decode_cache_aware`: the same loads plus what each worker's prefix
               cache already holds of the prompt, from the global prefix index (router/cache/prefix_index.py),
               behind a hot-spot guard (`Balance`).
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Why a worker was chosen (the `reason` of tandem_router_routing_decisions_total):
#   prefix_hit      cache_aware, and the chosen worker holds part of the prompt
#   load            the chosen worker holds none of it (a cold prompt, or the holders were busier), or policy "load"
#   hot_spot_guard  cache_aware chose a worker far busier than the least loaded one; the load choice overrode it
#   no_index        cache_aware, but no prefix index, or it knows none of the pool's live workers: load choice
ROUTING_REASONS = ("prefix_hit", "load", "hot_spot_guard", "no_index")


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """A worker's last reported stats plus what this router sent it since that report was asked for."""

    worker_id: str
    num_waiting_tokens: int  # prompt tokens queued, not yet computed
    num_free_blocks: int  # may go negative: an estimate after this router's own unreported requests
    num_running: int  # running plus waiting requests


@dataclass(frozen=True, slots=True)
class Balance:
    """The hot-spot guard of cache_aware routing: SGLang's cache-aware router's imbalance test (its
    `balance_abs_threshold` and `balance_rel_threshold`, load = requests on the worker), applied to the worker the
    cache chose: it is a hot spot when it has more than `abs_threshold` requests more than the least loaded
    candidate AND more than `rel_threshold` times as many. Then the load choice wins.

    Why a guard on requests when the prefill cost already counts queued tokens: a worker that holds a popular
    prefix draws every request of it, each cheap in uncached tokens, so its token queue stays short while its
    request count (attention over the cached context, per-request overhead, KV held for hand-off) grows. SGLang's
    defaults (64 and 1.5 in sglang-router/smg) fit GPU servers batching hundreds of requests; tandem's CPU workers
    run tens (max_num_seqs 64, a few in flight on 2 cores), so the absolute threshold is 8.
    """

    abs_threshold: int = 8
    rel_threshold: float = 1.5

    def is_hot_spot(self, chosen: WorkerLoad, least: WorkerLoad) -> bool:
        return (chosen.num_running - least.num_running > self.abs_threshold
                and chosen.num_running > self.rel_threshold * least.num_running)


@dataclass(frozen=True, slots=True)
class Choice:
    worker_id: str
    reason: str  # one of ROUTING_REASONS


def pick_prefill(loads: Iterable[WorkerLoad]) -> str | None:
    """The worker with the fewest queued prompt tokens (its first token comes soonest); ties at random."""
    best = min(loads, key=lambda w: (w.num_waiting_tokens, w.num_running, random.random()), default=None)
    return None if best is None else best.worker_id


def pick_decode(loads: Iterable[WorkerLoad]) -> str | None:
    """The worker with the most free KV blocks, then the fewest requests; ties at random.

    Free blocks first: a decode worker that runs out of blocks preempts (recomputes) requests, which costs far
    more than the slightly larger batch of a busier worker.
    """
    best = min(loads, key=lambda w: (-w.num_free_blocks, w.num_running, random.random()), default=None)
    return None if best is None else best.worker_id


def pick_prefill_cache_aware(loads: Iterable[WorkerLoad], prompt_len: int, cached_tokens: Mapping[str, int],
                             balance: Balance = Balance()) -> Choice | None:
    """The worker with the least prefill work ahead of the request's first token: its uncached prompt tokens there
    (`prompt_len - cached_tokens[worker]`) plus the prompt tokens already queued there; then the fewest requests;
    ties at random. Dynamo's KV router and llm-d's precise prefix scorer weigh the same two things (prefix overlap
    against load); counting both in tokens needs no weights: a token to compute costs the same wherever it waits.
    A choice that is a hot spot (`Balance`) gives way to `pick_prefill`."""
    loads = list(loads)
    if not loads:
        return None

    def key(w: WorkerLoad):
        uncached = prompt_len - min(cached_tokens.get(w.worker_id, 0), prompt_len)
        return uncached + max(w.num_waiting_tokens, 0), w.num_running, random.random()

    return _guarded(min(loads, key=key), loads, cached_tokens, pick_prefill, balance)


def pick_decode_cache_aware(loads: Iterable[WorkerLoad], held_blocks: Mapping[str, int],
                            balance: Balance = Balance()) -> Choice | None:
    """`pick_decode` counting the prompt blocks a worker already holds as free: importing the KV there reuses them
    (the engine's import skips blocks it caches), so it allocates and copies that many fewer, and requests sharing a
    prefix share its blocks. Then the fewest requests; ties at random; a hot spot gives way to `pick_decode`."""
    loads = list(loads)
    if not loads:
        return None
    best = min(loads, key=lambda w: (-(w.num_free_blocks + held_blocks.get(w.worker_id, 0)), w.num_running,
                                     random.random()))
    return _guarded(best, loads, held_blocks, pick_decode, balance)


def _guarded(best: WorkerLoad, loads: list[WorkerLoad], matched: Mapping[str, int], by_load,
             balance: Balance) -> Choice:
    least = min(loads, key=lambda w: w.num_running)
    if balance.is_hot_spot(best, least):
        # The load policy's choice among the workers that are not hot spots (the least loaded one never is).
        return Choice(by_load([w for w in loads if not balance.is_hot_spot(w, least)]), "hot_spot_guard")
    return Choice(best.worker_id, "prefix_hit" if matched.get(best.worker_id, 0) > 0 else "load")
