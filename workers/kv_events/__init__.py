"""Publishing the engine's KV cache events to Redis for the routers' global prefix index (`publisher.py`)."""
from workers.kv_events.publisher import HASH_VERSION, KVEventPublisher, KVEventsConfig

__all__ = ["HASH_VERSION", "KVEventPublisher", "KVEventsConfig"]
