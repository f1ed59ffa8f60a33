"""The OpenAI HTTP front against real workers (WorkerServer with the default GGUF): greedy text over HTTP, streamed
or not, is the text the gRPC API gives for the same prompt."""
from __future__ import annotations

import pytest

from tandem.v1 import generation_pb2 as pb
from tests.router.conftest import real_router_env
from tests.router.helpers import Stream
from tests.router.test_openai_http import HTTPClient
from tests.servers import worker_servers

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "user", "content": "Write a haiku about GPUs."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def real_workers():
    with worker_servers(("prefill", "decode")) as workers:
        yield workers


@pytest.fixture
def env(aio, served_model, real_workers):
    env = real_router_env(aio, served_model, real_workers, max_local_prefill_length=4)
    env.http = HTTPClient(env.router.http_address, timeout_s=60)
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
