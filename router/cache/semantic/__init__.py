"""The semantic response cache (issue 10, item 5): opted-in deterministic requests answered from an earlier answer
to the same question in other words, per tenant. cache.py (Redis and the lifecycle), index.py (the in-memory
index), embedder.py (all-MiniLM-L6-v2), guards.py (near-duplicates that mean something else), query.py (the
opt-in, keys and tenant scope), metrics.py.
"""
from router.cache.semantic.cache import Lookup, SemanticCache, open_lookup
from router.cache.semantic.config import SemanticCacheConfig
from router.cache.semantic.guards import conflict
from router.cache.semantic.index import CacheEntry, SemanticIndex
from router.cache.semantic.query import (FIELD, OPT_IN_HEADER, TENANT_HEADER, TENANT_METADATA, SemanticQuery,
                                         from_openai, from_proto)

__all__ = ["FIELD", "OPT_IN_HEADER", "TENANT_HEADER", "TENANT_METADATA", "CacheEntry", "Lookup", "SemanticCache",
           "SemanticCacheConfig", "SemanticIndex", "SemanticQuery", "conflict", "from_openai", "from_proto",
           "open_lookup"]
