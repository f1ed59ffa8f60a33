"""`tandem generate` as a user runs it (a subprocess) against a real router and real workers (the default GGUF):
the README's first example prints a real answer, because the prompt goes as a chat message; `--raw` sends text."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from router import ServedModel
from tandem.v1 import generation_pb2 as pb
from tests.router.conftest import LoopThread, real_router_env
from tests.router.helpers import Stream
from tests.servers import worker_servers

pytestmark = pytest.mark.slow

README_PROMPT = "Write a haiku about GPUs."


@pytest.fixture(scope="module")
def aio():
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def model() -> ServedModel:
    return ServedModel.load(None)


@pytest.fixture(scope="module")
def workers():
    with worker_servers(("both",)) as servers:
        yield servers


@pytest.fixture(scope="module")
def env(aio, model, workers):
    env = real_router_env(aio, model, workers, mode="colocated")
    yield env
    env.close()


def tandem_generate(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", "generate", *args, "--address", address],
                          capture_output=True, text=True, timeout=120)


def greedy(env, request: pb.GenerateRequest, max_tokens: int) -> str:
    request.sampling.CopyFrom(pb.SamplingParams(temperature=0, max_tokens=max_tokens))
    return Stream(env.generate(request, timeout=60)).text


def test_readme_example_prints_the_chat_answer(env):
    out = tandem_generate(env.address, README_PROMPT, "--max-tokens", "64")
    assert out.returncode == 0, out.stderr
    chat = pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=README_PROMPT)]))
    expected = greedy(env, chat, 64)
    assert expected.strip() and out.stdout == expected
    assert "completion" in out.stderr and "TTFT" in out.stderr
    # --chat, kept for old scripts, is the default.
    assert tandem_generate(env.address, README_PROMPT, "--max-tokens", "64", "--chat").stdout == out.stdout


def test_raw_sends_plain_text(env):
    out = tandem_generate(env.address, "The capital of France is", "--raw", "--max-tokens", "8")
    assert out.returncode == 0, out.stderr
    expected = greedy(env, pb.GenerateRequest(text="The capital of France is"), 8)
    assert expected.strip() and out.stdout == expected
    both = tandem_generate(env.address, "hi", "--raw", "--chat")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_a_model_without_chat_template_gets_plain_text(aio, model, workers):
    tokenizer = copy.copy(model.tokenizer)
    tokenizer.chat_template = None
    plain = real_router_env(aio, ServedModel(model.name, tokenizer, model.vocab_size), workers, mode="colocated")
    try:
        out = tandem_generate(plain.address, "The capital of France is", "--max-tokens", "8")
        assert out.returncode == 0, out.stderr
        assert "no chat template" in out.stderr
        assert out.stdout == greedy(plain, pb.GenerateRequest(text="The capital of France is"), 8)
    finally:
        plain.close()
