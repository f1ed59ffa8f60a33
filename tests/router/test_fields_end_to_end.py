"""Request fields with real workers (WorkerServer with the default GGUF): logit_bias steers greedy decoding from
both fronts, and continue_final_message continues the assistant's text."""
from __future__ import annotations

import grpc
import pytest

from tandem.v1 import generation_pb2 as pb
from tests.router.conftest import real_router_env, wait_for
from tests.router.helpers import Stream
from tests.router.test_openai_http import HTTPClient
from tests.servers import worker_servers

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def env(aio, served_model):
    with worker_servers(("prefill", "decode")) as workers:
        env = real_router_env(aio, served_model, workers, max_local_prefill_length=4)
        env.http = HTTPClient(env.router.http_address, timeout_s=60)
        env.worker_servers = workers
        yield env
        env.http.close()
        env.close()


def greedy(env, **sampling) -> list[int]:
    options = {"temperature": 0, "max_tokens": 3, "ignore_eos": True, **sampling}
    request = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(**options))
    return Stream(env.generate(request, timeout=60)).token_ids


def test_logit_bias_forces_and_bans_tokens_on_both_fronts(env):
    tok = env.model.tokenizer
    base = greedy(env)
    banana = tok.encode(" banana", add_special_tokens=False)[0]
    assert greedy(env, logit_bias={banana: 100.0}) == [banana] * 3
    assert greedy(env, logit_bias={base[0]: -100.0})[0] != base[0]

    def http(bias: dict) -> dict:
        status, _, body = env.http.json("POST", "/v1/completions", {
            "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "logprobs": 0,
            "logit_bias": bias})
        assert status == 200, body
        return body["choices"][0]

    assert http({str(banana): 100})["text"] == tok.decode([banana] * 3)
    banned = http({str(base[0]): -100})["logprobs"]["tokens"]
    assert banned[0] != tok.decode([base[0]])


def test_continue_final_message_continues_the_assistants_text(env):
    messages = [{"role": "user", "content": "Spell hello in capitals."}, {"role": "assistant", "content": "Sure: HEL"}]
    status, _, body = env.http.json("POST", "/v1/chat/completions", {
        "messages": messages, "continue_final_message": True, "add_generation_prompt": False, "max_tokens": 5,
        "temperature": 0})
    assert status == 200, body
    [choice] = body["choices"]
    prompt = env.stub.Tokenize(pb.TokenizeRequest(chat=pb.ChatMessages(
        messages=[pb.ChatMessage(**m) for m in messages], add_generation_prompt=False,
        continue_final_message=True)), timeout=10).token_ids
    assert env.model.tokenizer.decode(prompt, skip_special_tokens=False).endswith("assistant\nSure: HEL")
    assert body["usage"]["prompt_tokens"] == len(prompt)
    assert choice["message"]["content"].startswith("LO")


def test_refused_requests_leave_the_workers_idle_and_the_router_serving(env):
    for body in ({"prompt": PROMPT, "seed": 1 << 63}, {"prompt": PROMPT, "temperature": float("inf")},
                 {"prompt": PROMPT, "logit_bias": {"49152": 1}}, {"prompt": PROMPT, "suffix": "x"}):
        status, _, error = env.http.json("POST", "/v1/completions", body)
        assert status == 400, error
    with pytest.raises(grpc.RpcError) as info:
        greedy(env, temperature=float("inf"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(greedy(env)) == 3
    wait_for(lambda: all(w.stats().num_running == 0 and w.stats().num_waiting == 0 for w in env.worker_servers),
             timeout_s=10, what="idle workers")
    assert all(w.stats().num_kv_held == 0 and w.stats().num_used_blocks == 0 for w in env.worker_servers)
