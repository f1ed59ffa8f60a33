"""The OpenAI HTTP front against real workers (WorkerServer with the default GGUF): greedy text over HTTP, streamed
or not, is the text the gRPC API gives for the same prompt."""
from __future__ import annotations

import pytest

from router import Router, RouterConfig
from tandem.v1 import generation_pb2 as pb
from tests.router.conftest import Env
from tests.router.fakes import FakeCluster, FakeRegistry
from tests.router.helpers import Stream
from tests.router.test_openai_http import HTTPClient

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Write a haiku about GPUs."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def real_workers():
    from workers.server import WorkerConfig, WorkerServer

    engine = dict(kv_cache_memory_bytes=64 << 20, max_model_len=1024)
    workers = [WorkerServer(WorkerConfig(role=role, engine=engine, torch_threads=1)) for role in ("prefill", "decode")]
    for w in workers:
        w.start()
    yield workers
    for w in workers:
        w.stop()


@pytest.fixture
def env(aio, served_model, real_workers):
    registry = FakeRegistry()

    async def start():
        await registry.start()
        registry.set_workers([w.info for w in real_workers])
        router = Router(RouterConfig(port=0, http_port=0, registry_address=registry.address, max_local_prefill_length=4,
                                     registry_poll_interval_s=0.05, stats_poll_interval_s=0.02), model=served_model)
        address = await router.start()
        await router.wait_ready(timeout_s=10)
        return router, address

    router, address = aio.run(start())
    env = Env(aio, FakeCluster(), registry, [], router, address, served_model)
    env.http = HTTPClient(router.http_address, timeout_s=60)
    yield env
    env.http.close()
    env.close()


def test_greedy_text_over_http_equals_grpc(env):
    sampling = pb.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    grpc_chat = Stream(env.generate(pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in MESSAGES]), sampling=sampling), timeout=60))
    grpc_text = Stream(env.generate(pb.GenerateRequest(text=PROMPT, sampling=sampling), timeout=60))
    assert len(grpc_chat.token_ids) == 20 and grpc_chat.text

    options = {"temperature": 0, "max_tokens": 20, "ignore_eos": True}
    status, _, chat = env.http.json("POST", "/v1/chat/completions", {"messages": MESSAGES, **options})
    assert status == 200, chat
    assert chat["choices"][0]["message"]["content"] == grpc_chat.text
    assert chat["usage"]["completion_tokens"] == 20
    assert chat["usage"]["prompt_tokens"] == grpc_chat.complete.usage.prompt_tokens

    resp, events = env.http.events("/v1/completions", {"prompt": PROMPT, "stream": True, **options})
    assert resp.status == 200 and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == grpc_text.text
    assert events[-2]["choices"][0]["finish_reason"] == "length"
