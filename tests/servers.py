"""Real WorkerServers for tests: the default GGUF, a small KV cache, one torch thread each."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

ENGINE = dict(kv_cache_memory_bytes=64 << 20, max_model_len=1024)


@contextmanager
def worker_servers(roles: Sequence[str], telemetry_factory=None) -> Iterator[list]:
    """Started workers, one per role; stopped on exit (those a test has not stopped itself).
    `telemetry_factory()` gives each worker its Telemetry (default: the worker's own)."""
    from workers.server import WorkerConfig, WorkerServer

    servers = [WorkerServer(WorkerConfig(role=role, engine=ENGINE, torch_threads=1),
                            telemetry=telemetry_factory() if telemetry_factory else None) for role in roles]
    try:
        for s in servers:
            s.start()
        yield servers
    finally:
        for s in servers:
            if s.info is not None:
                s.stop()
