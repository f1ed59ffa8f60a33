"""The semantic cache's settings (no imports from the router: RouterConfig holds one)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SemanticCacheConfig:
    """The per-deployment switch is `RouterConfig.semantic_cache` (None: off); these are its settings.

    similarity_threshold: the cosine similarity (all-MiniLM-L6-v2) at or above which an entry may answer, after
        every guard passes. 0.82 was chosen on benchmarks/data/semantic_cache_eval.jsonl: with the guards, 84% of
        its paraphrases hit and none of its hard negatives (0.80: 88% and 0%; 0.85: 77% and 0%); see
        benchmarks/bench_semantic_cache.py.
    ttl_s: how long an entry lives (Redis PX and the index).
    max_entries_per_tenant: the oldest entries of a tenant go past it (in Redis and in each router).
    max_entries: the most one router's index holds over all tenants (the oldest go first); with auth off any
        X-Tenant-Id is a tenant.
    poll_interval_s: how often a router reads other routers' writes.
    embed_timeout_s: a lookup waits at most this for its embedding, then the request goes on as a miss.
    """

    similarity_threshold: float = 0.82
    ttl_s: float = 24 * 3600.0
    max_entries_per_tenant: int = 10_000
    max_entries: int = 100_000
    poll_interval_s: float = 0.5
    embed_timeout_s: float = 1.0

    def __post_init__(self):
        if not 0 < self.similarity_threshold <= 1:
            raise ValueError(f"semantic_cache.similarity_threshold: must be in (0, 1], got {self.similarity_threshold}")
        for name in ("ttl_s", "poll_interval_s", "embed_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"semantic_cache.{name}: must be > 0, got {getattr(self, name)}")
        if self.max_entries < self.max_entries_per_tenant:
            raise ValueError(f"semantic_cache.max_entries: must be >= max_entries_per_tenant "
                             f"({self.max_entries_per_tenant}), got {self.max_entries}")
        if self.max_entries_per_tenant < 1:
            raise ValueError(f"semantic_cache.max_entries_per_tenant: must be >= 1, got {self.max_entries_per_tenant}")


def add_semantic_cache_arguments(parser) -> None:
    """`tandem up`'s switch for the semantic response cache."""
    parser.add_argument("--semantic-cache", action="store_true",
                        help="serve requests that opt in (body semantic_cache: true, header X-Semantic-Cache: on, "
                             "gRPC GenerateRequest.semantic_cache) from the semantic response cache (default off)")
    parser.add_argument("--semantic-cache-threshold", type=float, default=None,
                        help="cosine similarity at or above which a cached answer may be used "
                             f"(default {SemanticCacheConfig.similarity_threshold}; needs --semantic-cache)")


def semantic_cache_from_args(args) -> SemanticCacheConfig | None:
    """The config of `--semantic-cache` (None: off); ValueError naming the option."""
    if not args.semantic_cache:
        if args.semantic_cache_threshold is not None:
            raise ValueError("--semantic-cache-threshold: needs --semantic-cache (the cache is off without it)")
        return None
    threshold = args.semantic_cache_threshold
    try:
        return SemanticCacheConfig(similarity_threshold=SemanticCacheConfig.similarity_threshold
                                   if threshold is None else threshold)
    except ValueError as e:
        if str(e).startswith("semantic_cache.similarity_threshold:"):
            raise ValueError("--semantic-cache-threshold:" + str(e).split(":", 1)[1]) from None
        raise
