"""Redis beside the cluster: the embedded server (`server.py`) and fail-fast clients behind a circuit breaker
(`client.py`). Workers publish KV events here, routers read the global prefix index and the semantic cache from it.
"""
from tandem.redis_store.client import CircuitBreaker, RedisStore, RedisUnavailable, StoreConfig
from tandem.redis_store.server import EmbeddedRedis, find_server_binary

__all__ = ["CircuitBreaker", "EmbeddedRedis", "RedisStore", "RedisUnavailable", "StoreConfig", "find_server_binary"]
