"""Fixtures: one asyncio loop thread for all servers, the default model's tokenizer, and `make_env` that starts a
fake registry, fake workers and a real Router on free ports. Tests talk to the router with sync gRPC clients."""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from router import Router, RouterConfig, ServedModel
from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc, worker_pb2_grpc
from tests.router.fakes import FakeCluster, FakeRegistry, FakeWorker

SCRIPT_TEXT = " The quick brown fox jumps over the lazy dog, and then it naps in the warm sun."


class LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-aio", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30.0):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done():  # the coroutine's own TimeoutError (the same class from 3.11 on)
                raise
            future.cancel()
            # Name what the loop was still doing: the only clue to a hang seen once in CI.
            tasks = sorted(f"{t.get_name()}: {t.get_coro()!r}" for t in asyncio.all_tasks(self.loop))
            raise AssertionError(f"{coro!r} did not finish in {timeout} s; loop tasks:\n  "
                                 + "\n  ".join(tasks)) from None

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@pytest.fixture(scope="session")
def aio():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def served_model() -> ServedModel:
    return ServedModel.load(None)


@pytest.fixture(scope="session")
def script(served_model) -> list[int]:
    """What fake workers generate: SCRIPT_TEXT, then EOS, on which they say "stop" as a real engine does (the
    router then leaves the stop token's text out)."""
    return served_model.tokenizer.encode(SCRIPT_TEXT, add_special_tokens=False) + [served_model.tokenizer.eos_token_id]


class Env:
    def __init__(self, aio: LoopThread, cluster: FakeCluster, registry: FakeRegistry, workers: list[FakeWorker],
                 router: Router, address: str, model: ServedModel):
        self.aio, self.cluster, self.registry, self.workers = aio, cluster, registry, workers
        self.router, self.address, self.model = router, address, model
        self.channel = grpc.insecure_channel(address)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.cluster_stub = worker_pb2_grpc.ClusterStub(self.channel)

    def by_role(self, role: str) -> list[FakeWorker]:
        return [w for w in self.workers if w.role == role]

    def generate(self, request: pb.GenerateRequest, timeout: float = 10.0) -> list[pb.GenerateResponse]:
        return list(self.stub.Generate(request, timeout=timeout))

    def register(self, workers: list[FakeWorker]) -> None:
        self.registry.set_workers([w.info for w in workers])

    def close(self) -> None:
        self.channel.close()
        self.aio.run(self.router.stop(grace_s=0))
        for w in self.workers:
            self.aio.run(w.stop())
        self.aio.run(self.registry.stop())


def real_router_env(aio: LoopThread, model: ServedModel, workers: list, telemetry=None, **config) -> Env:
    """A Router over a FakeRegistry that lists `workers` (real WorkerServers, already started), ready to serve."""
    registry = FakeRegistry()

    async def start():
        await registry.start()
        registry.set_workers([w.info for w in workers])
        options = dict(port=0, http_port=0, registry_address=registry.address, registry_poll_interval_s=0.05,
                       stats_poll_interval_s=0.02)
        router = Router(RouterConfig(**{**options, **config}), model=model, telemetry=telemetry)
        address = await router.start()
        await router.wait_ready(timeout_s=30)
        return router, address

    router, address = aio.run(start(), timeout=60)
    return Env(aio, FakeCluster(), registry, [], router, address, model)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def make_env(aio, served_model, script):
    envs: list[Env] = []

    def make(prefill: int = 1, decode: int = 1, both: int = 0, *, wait_ready: bool = True,
             worker_options: dict | None = None, **config) -> Env:
        cluster = FakeCluster()
        registry = FakeRegistry()
        workers = [FakeWorker(cluster, role, script, **(worker_options or {}))
                   for role, n in (("prefill", prefill), ("decode", decode), ("both", both)) for _ in range(n)]

        async def start():
            await registry.start()
            for w in workers:
                await w.start()
            registry.set_workers([w.info for w in workers])
            defaults = dict(port=0, http_port=0, registry_address=registry.address, max_local_prefill_length=4,
                            registry_poll_interval_s=0.05, stats_poll_interval_s=0.02)
            mode = "colocated" if both and not (prefill or decode) else "disaggregated"
            router = Router(RouterConfig(**{"mode": mode, **defaults, **config}), model=served_model)
            address = await router.start()
            if wait_ready:
                await router.wait_ready(timeout_s=5)
            return router, address

        router, address = aio.run(start())
        env = Env(aio, cluster, registry, workers, router, address, served_model)
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()
