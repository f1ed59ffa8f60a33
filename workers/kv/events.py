"""KV cache events: what the prefix cache gains and loses, by chained block hash (vLLM's KV event names).

The block pool records them as they happen (a list append); the engine hands them out with `take_kv_events()`
and a worker publishes them (workers/kv_events/). Replaying the events in order on an empty set gives the set
of block hashes the pool caches, which is what routers index.

The log is bounded: past `max_pending_hashes` hashes not yet taken, it is replaced by the pool's current state
(`AllBlocksCleared`, then one `BlockStored` of every cached hash), which replays to the same set.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class BlockStored:
    """Full blocks registered in the prefix cache, in order (a later block may chain on an earlier one)."""

    block_hashes: list[int] = field(default_factory=list)


@dataclass(slots=True)
class BlockRemoved:
    """Blocks whose hash left the prefix cache (evicted for reuse, or dropped by a cache reset)."""

    block_hashes: list[int] = field(default_factory=list)


@dataclass(slots=True)
class AllBlocksCleared:
    """Nothing is cached any more: forget every block of this engine."""


KVCacheEvent = BlockStored | BlockRemoved | AllBlocksCleared


def replay(events: Iterable[KVCacheEvent], block_hashes: set[int] | None = None) -> set[int]:
    """Apply `events` in order to `block_hashes` (default: an empty set); returns the set."""
    cached = set() if block_hashes is None else block_hashes
    for event in events:
        if isinstance(event, BlockStored):
            cached.update(event.block_hashes)
        elif isinstance(event, BlockRemoved):
            cached.difference_update(event.block_hashes)
        else:
            cached.clear()
    return cached


class KVEventLog:
    """The pool's pending events, oldest first. Consecutive stores (or removals) share one record, so a step
    that fills many blocks appends ints to one list."""

    def __init__(self, current_hashes: Callable[[], Iterable[int]], max_pending_hashes: int):
        self._current = current_hashes
        self.max_pending_hashes = max_pending_hashes
        self._events: list[KVCacheEvent] = []
        self._num_hashes = 0
        self.num_compactions = 0  # times the log overflowed and was replaced by the pool's state

    def stored(self, block_hash: int) -> None:
        self._add(BlockStored, block_hash)

    def removed(self, block_hash: int) -> None:
        self._add(BlockRemoved, block_hash)

    def cleared(self) -> None:
        # Everything before a clear is moot.
        self._events = [AllBlocksCleared()]
        self._num_hashes = 0

    def take(self) -> list[KVCacheEvent]:
        """The pending events, oldest first; the log starts empty again."""
        events, self._events, self._num_hashes = self._events, [], 0
        return events

    def _add(self, kind: type, block_hash: int) -> None:
        events = self._events
        if events and type(events[-1]) is kind:
            events[-1].block_hashes.append(block_hash)
        else:
            events.append(kind([block_hash]))
        self._num_hashes += 1
        if self._num_hashes > self.max_pending_hashes:
            self._compact()

    def _compact(self) -> None:
        current = list(self._current())
        self._events = [AllBlocksCleared(), BlockStored(current)]
        self._num_hashes = len(current)
        self.num_compactions += 1
