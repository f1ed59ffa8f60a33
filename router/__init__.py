"""The router: tokenizes client requests, sends them to prefill and decode workers, streams tokens back."""
from router.config import RouterConfig
from router.model import ServedModel
from router.server import Router

__all__ = ["Router", "RouterConfig", "ServedModel"]
