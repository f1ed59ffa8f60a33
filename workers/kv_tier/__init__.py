"""A remote KV tier in Redis (KV offloading): evicted full blocks go to Redis; a worker that misses a prefix
locally pulls it back when its measured cost model says that beats recomputing. See tier.py."""
from workers.kv_tier.codec import BlockFormatError, BlockLayout, ChecksumError, decode_block, encode_block
from workers.kv_tier.cost import CostModel, Estimate
from workers.kv_tier.tier import KVTierConfig, PulledKV, RemoteKVTier, engine_layouts

__all__ = [
    "BlockFormatError", "BlockLayout", "ChecksumError", "CostModel", "Estimate", "KVTierConfig", "PulledKV",
    "RemoteKVTier", "decode_block", "encode_block", "engine_layouts",
]
