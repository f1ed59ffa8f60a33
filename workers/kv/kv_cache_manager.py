"""Maps each request to its block table, with prefix-cache lookups; the block pool does the accounting."""
from __future__ import annotations

from workers.kv.block_pool import BlockPool, KVBlock, hash_token_blocks
from workers.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, hash_extra: bytes = b"",
                 enable_kv_cache_events: bool = False):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_extra = hash_extra
        self.pool = BlockPool(num_blocks, enable_prefix_caching, enable_kv_cache_events)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self._num_hashed: dict[str, int] = {}  # leading blocks of a request already registered in the cache
        # Tokens of requests admitted for prefill here, and of those the ones served from the prefix cache; each
        # request counted once, at admission (record_prefix_lookup), however often it is scheduled or preempted.
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by requests; the rest are free (some of them cached and reusable)."""
        return self.pool.num_blocks - self.pool.num_free_blocks

    def num_cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Leading tokens of token_ids whose KV is cached, in full blocks; read-only (no stats, no LRU touch)."""
        if not self.enable_prefix_caching:
            return 0
        n = 0
        for block_hash in hash_token_blocks(token_ids, self.block_size, self.hash_extra):
            if self.pool.lookup(block_hash) is None:
                break
            n += self.block_size
        return n

    def num_cached_tokens_of(self, request: Request) -> int:
        """Leading tokens of a waiting request that its next scheduling would take from the prefix cache (full
        blocks, at least one token left to compute); read-only like `num_cached_prefix_tokens`, but incremental: the
        request's block hashes are computed once and kept. For the load a worker reports (queued prompt tokens)."""
        if not self.enable_prefix_caching:
            return 0
        self._update_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        n = 0
        for block_hash in request.block_hashes[:max_hit_blocks]:
            if self.pool.lookup(block_hash) is None:
                break
            n += self.block_size
        return n

    def block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(req_id, ())]

    def _update_hashes(self, request: Request) -> None:
        request.block_hashes = hash_token_blocks(
            request.all_token_ids, self.block_size, self.hash_extra, request.block_hashes
        )

    def get_computed_blocks(self, request: Request) -> list[KVBlock]:
        """Longest cached prefix of full blocks. At least one token is left to compute, for its logits.

        Counts nothing: a waiting request is looked up at every scheduling attempt, and again after a preemption;
        the scheduler calls record_prefix_lookup once, when it admits the request."""
        if not self.enable_prefix_caching:
            return []
        self._update_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def record_prefix_lookup(self, num_tokens: int, num_cached_tokens: int) -> None:
        """Count one admitted request: `num_tokens` looked up, `num_cached_tokens` of them found."""
        if self.enable_prefix_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_cached_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: list[KVBlock] = ()) -> bool:
        """Make room for num_new_tokens after the computed ones; False (and no change) if blocks run short."""
        held = self.req_blocks.get(request.req_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        need = -(-(num_computed + num_new_tokens) // self.block_size) - len(held) - len(computed_blocks)
        revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)  # cached-but-free blocks leave the free list
        if need + revived > self.pool.num_free_blocks:
            return False
        self.pool.take(list(computed_blocks))
        blocks = self.req_blocks.setdefault(request.req_id, held)
        if computed_blocks:
            # Prefix hits are only taken before a request holds anything; they are registered already.
            assert not blocks, "prefix hits after blocks were allocated"
            blocks.extend(computed_blocks)
            self._num_hashed[request.req_id] = len(computed_blocks)
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        return True

    def cache_blocks(self, request: Request) -> None:
        """Register the request's blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        done = self._num_hashed.get(request.req_id, 0)
        if num_full <= done:
            return
        self._update_hashes(request)
        blocks = self.req_blocks[request.req_id]
        for i in range(done, num_full):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self._num_hashed[request.req_id] = num_full

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.req_id, [])
        self._num_hashed.pop(request.req_id, None)
        self.pool.free(list(reversed(blocks)))
