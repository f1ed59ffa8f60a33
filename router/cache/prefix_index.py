"""The global prefix index: which worker's prefix cache holds which KV block, by chained block hash.

Fed by the workers' KV events (`router/cache/kv_events_follower.py`): a snapshot per worker, then the events after
it, in order. Pure data: no Redis, no asyncio, so the routing policy can be tested without servers.

Hashes are the engine's own (`workers.kv.block_pool.hash_token_blocks` with the model name as `extra`), so a
router computes a prompt's block hashes itself and asks `match()` how many leading blocks each worker holds.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# The engine's hash: blake2b, 8-byte digest, chained from ROOT_HASH over int64 token ids plus the model name.
# A worker or router with another version never mixes its hashes into the index.
HASH_VERSION = "blake2b64-v1"


@dataclass(slots=True)
class WorkerBlocks:
    """What the index knows of one worker: the engine start (`epoch`) and the last event batch applied (`seq`)."""

    worker_id: str
    epoch: str
    seq: int
    block_size: int
    block_hashes: set[int] = field(default_factory=set)
    # A batch was missed (seq jumped): its blocks are not scored until a newer snapshot resyncs it.
    stale: bool = False


class PrefixIndex:
    """worker id -> cached block hashes, and block hash -> workers holding it."""

    def __init__(self):
        self.workers: dict[str, WorkerBlocks] = {}
        self._holders: dict[int, set[str]] = {}

    # --- updates ----------------------------------------------------------------------------------------------

    def load_snapshot(self, worker_id: str, epoch: str, seq: int, block_size: int, block_hashes: Iterable[int]) -> None:
        """Replace everything known of `worker_id` with a snapshot that covers its batches up to `seq`."""
        self.remove_worker(worker_id)
        w = self.workers[worker_id] = WorkerBlocks(worker_id, epoch, seq, block_size)
        self._add(w, block_hashes)

    def apply(self, worker_id: str, epoch: str, seq: int, stored: Iterable[int] = (), removed: Iterable[int] = (),
              cleared: bool = False) -> str:
        """Apply one event batch. Returns what happened: "applied"; "old" (already covered by the snapshot or a
        batch before it); "gap" (a batch between was missed: the worker is marked stale, not scored, until
        `load_snapshot`); "unknown" (no snapshot of this worker or this epoch yet: ignored until one arrives).
        Within a batch, `cleared` applies first, then `removed`, then `stored`."""
        w = self.workers.get(worker_id)
        if w is None or w.epoch != epoch:
            return "unknown"
        if seq <= w.seq:
            return "old"
        if seq != w.seq + 1 or w.stale:
            w.stale = True
            w.seq = max(w.seq, seq)
            return "gap"
        w.seq = seq
        if cleared:
            self._discard(w, list(w.block_hashes))
        self._discard(w, removed)
        self._add(w, stored)
        return "applied"

    def remove_worker(self, worker_id: str) -> None:
        w = self.workers.pop(worker_id, None)
        if w is not None:
            self._discard(w, list(w.block_hashes))

    def _add(self, w: WorkerBlocks, block_hashes: Iterable[int]) -> None:
        for h in block_hashes:
            if h not in w.block_hashes:
                w.block_hashes.add(h)
                self._holders.setdefault(h, set()).add(w.worker_id)

    def _discard(self, w: WorkerBlocks, block_hashes: Iterable[int]) -> None:
        for h in block_hashes:
            if h in w.block_hashes:
                w.block_hashes.discard(h)
                holders = self._holders.get(h)
                if holders is not None:
                    holders.discard(w.worker_id)
                    if not holders:
                        del self._holders[h]

    # --- queries ----------------------------------------------------------------------------------------------

    def match(self, block_hashes: Sequence[int], worker_ids: Iterable[str] | None = None) -> dict[str, int]:
        """Leading blocks of `block_hashes` (a prompt's chained hashes, in order) each worker holds.

        Only workers in `worker_ids` (default: all) that are not stale; workers holding none are left out.
        O(matched blocks x holders), not O(index)."""
        allowed = None if worker_ids is None else set(worker_ids)
        counts: dict[str, int] = {}
        active: set[str] | None = None
        for i, h in enumerate(block_hashes):
            holders = self._holders.get(h)
            if not holders:
                break
            active = set(holders) if active is None else active & holders
            if allowed is not None:
                active &= allowed
            active = {wid for wid in active if not self.workers[wid].stale}
            if not active:
                break
            for wid in active:
                counts[wid] = i + 1
        return counts

    def num_blocks(self, worker_id: str | None = None) -> int:
        """Blocks indexed for one worker, or for all of them."""
        if worker_id is not None:
            w = self.workers.get(worker_id)
            return 0 if w is None else len(w.block_hashes)
        return sum(len(w.block_hashes) for w in self.workers.values())
