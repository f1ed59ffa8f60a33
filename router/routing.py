"""What cache-aware routing needs per request: the prompt's block hashes (computed once, as the engine computes
them) and the route a choice made (the worker, why, and how much of the prompt the index says it caches)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from router.cache.prefix_index import PrefixIndex
from workers.kv.block_pool import hash_token_blocks

if TYPE_CHECKING:
    from router.pool import WorkerHandle


class PromptBlocks:
    """One prompt's chained block hashes, per block size, computed on first use.

    The hashes are the engine's (`hash_token_blocks` with the model name as `extra`: `KVCacheManager(...,
    hash_extra=model_name.encode())` in workers/engine.py, where model_name is what the worker reports as
    `WorkerInfo.model` and the pool only keeps workers whose model is the router's). Only the first
    `(len(prompt) - 1) // block_size` blocks: the engine always computes the prompt's last token (for its logits),
    so it never reuses more (`KVCacheManager.get_computed_blocks`), and a prediction beyond that would never be
    reported back as cached."""

    def __init__(self, token_ids: Sequence[int], model_name: str):
        self.token_ids = token_ids
        self.extra = model_name.encode()
        self._hashes: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.token_ids)

    def hashes(self, block_size: int) -> list[int]:
        hashes = self._hashes.get(block_size)
        if hashes is None:
            hashes = self._hashes[block_size] = hash_token_blocks(list(self.token_ids[:-1]), block_size, self.extra)
        return hashes


def match_tokens(index: PrefixIndex, prompt: PromptBlocks, workers: Iterable[WorkerHandle]) -> dict[str, int]:
    """Leading prompt tokens each worker's prefix cache holds, by the index; workers holding none are left out.

    Hashed per block size (normally one for the whole cluster). A worker whose indexed block size differs from the
    one it registered with is not scored (its hashes would not be comparable)."""
    by_size: dict[int, list[str]] = {}
    for w in workers:
        indexed = index.workers.get(w.worker_id)
        if indexed is not None and w.info.block_size > 0 and indexed.block_size == w.info.block_size:
            by_size.setdefault(w.info.block_size, []).append(w.worker_id)
    tokens: dict[str, int] = {}
    for block_size, worker_ids in by_size.items():
        for worker_id, num_blocks in index.match(prompt.hashes(block_size), worker_ids).items():
            tokens[worker_id] = num_blocks * block_size
    return tokens


@dataclass(frozen=True, slots=True)
class Route:
    """A worker choice: who, and why (router.policy.ROUTING_REASONS)."""

    worker: WorkerHandle
    reason: str
    # The prompt tokens the index says `worker` caches; None when the choice did not consult the index (policy
    # "load", or no index).
    num_cached_tokens: int | None = None
