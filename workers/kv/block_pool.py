"""Block pool: reference counts, the free list, and the prefix cache of full blocks.

A block with ref_cnt == 0 sits in the free list. If it also has a hash it is still a valid cached prefix
block: a later request can revive it (prefix hit) until allocation reuses it, oldest-freed first (LRU).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from workers.kv.events import KVCacheEvent, KVEventLog

# Root of every hash chain; fixed so that hashes agree across processes and restarts.
ROOT_HASH = 0x7A6E_64E6_0000_0001


def hash_block_tokens(parent_hash: int, token_ids: list[int] | tuple[int, ...], extra: bytes = b"") -> int:
    """Chained hash of one full block: depends on every token before it through parent_hash.

    blake2b rather than Python's hash(), so routers and engines in other processes compute the same keys.
    `extra` keys anything else that changes the KV (model name, adapter).
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(parent_hash.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    h.update(extra)
    return int.from_bytes(h.digest(), "little")


def hash_token_blocks(token_ids: list[int], block_size: int, extra: bytes = b"", start_hashes: list[int] | None = None) -> list[int]:
    """Hashes of all full blocks of token_ids, continuing from already known start_hashes."""
    hashes = list(start_hashes or [])
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[i : i + block_size], extra)
        hashes.append(parent)
    return hashes


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None


class BlockPool:
    """`enable_kv_cache_events`: record what the prefix cache gains and loses (`take_events()`); off, nothing
    is recorded."""

    def __init__(self, num_blocks: int, enable_caching: bool = True, enable_kv_cache_events: bool = False):
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Ordered oldest-freed first: allocation pops from the front, so recently used prefixes survive longest.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block_hash -> block_id
        self.num_evictions = 0
        # Bounded at a few times the pool: an undrained log is replaced by the pool's state (KVEventLog).
        self.events: KVEventLog | None = (
            KVEventLog(self._cached.keys, max(4 * num_blocks, 4096)) if enable_kv_cache_events else None)
        # (block_id, block_hash) of cached blocks that allocation evicted since the engine last took them; None:
        # not recorded. A KV offloader copies them out before the new owner's KV overwrites their slots.
        self.evicted: list[tuple[int, int]] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: int) -> KVBlock | None:
        block_id = self._cached.get(block_hash)
        return None if block_id is None else self.blocks[block_id]

    def take(self, blocks: list[KVBlock]) -> None:
        """Add a reference to each block (prefix hits); a free cached block leaves the free list."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def allocate(self, num_blocks: int) -> list[KVBlock]:
        if num_blocks > len(self._free):
            raise RuntimeError(f"allocate: need {num_blocks} blocks, {len(self._free)} free")
        out = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each block. Pass blocks tail-first: the tail of a sequence is the least
        likely to be shared, so it should be the first to be reused."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None or not self.enable_caching:
                    self._drop_hash(block)
                self._free[block.block_id] = None

    def cache_block(self, block: KVBlock, block_hash: int) -> None:
        """Register a block that is now full under its chained hash (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # an identical block is cached already; this one stays private
        block.block_hash = block_hash
        self._cached[block_hash] = block.block_id
        if self.events is not None:
            self.events.stored(block_hash)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block no request holds (blocks in use keep their hash)."""
        for block_hash, block_id in list(self._cached.items()):
            if self.blocks[block_id].ref_cnt == 0:
                self._drop_hash(self.blocks[block_id])
        if self.events is not None and not self._cached:
            self.events.cleared()

    def take_events(self) -> list[KVCacheEvent]:
        """Events recorded since the last call, oldest first ([] when events are off)."""
        return [] if self.events is None else self.events.take()

    def _evict(self, block: KVBlock) -> None:
        self.num_evictions += 1
        if self.evicted is not None:
            self.evicted.append((block.block_id, block.block_hash))
        self._drop_hash(block)

    def _drop_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None and self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
            if self.events is not None:
                self.events.removed(block.block_hash)
        block.block_hash = None
