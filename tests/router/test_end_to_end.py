"""The router against real workers (workers.server.WorkerServer with the default GGUF): greedy streams are the same
whichever path they take (hand-off, local prefill, migration after a worker dies), and nothing stays held."""
from __future__ import annotations

import asyncio
import time

import pytest

from tandem.v1 import generation_pb2 as pb
from tests.router.conftest import real_router_env, wait_for
from tests.router.helpers import Stream
from tests.servers import worker_servers

pytestmark = pytest.mark.slow

CHAT = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Write a haiku about GPUs.")])


def chat_request(max_tokens: int = 24) -> pb.GenerateRequest:
    return pb.GenerateRequest(chat=CHAT, sampling=pb.SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                   ignore_eos=True))


@pytest.fixture(scope="module")
def real_workers():
    with worker_servers(("prefill", "decode", "decode")) as workers:
        yield workers


@pytest.fixture
def real_env(aio, served_model, real_workers):
    env = real_router_env(aio, served_model, [w for w in real_workers if w.info is not None],
                          max_local_prefill_length=8)
    yield env
    env.close()


def no_blocks_held(workers) -> bool:
    return all(w.stats().num_running == 0 and w.stats().num_kv_held == 0 and w.stats().num_used_blocks == 0
               for w in workers if w.info is not None)


def test_paths_agree_and_nothing_stays_held(real_env, real_workers):
    env = real_env
    handed_off = Stream(env.generate(chat_request(), timeout=60))
    assert handed_off.complete.timings.kv_transfer_ms > 0
    # The same prompt again is cached on the decode worker that imported it: it is prefilled there.
    local = Stream(env.generate(chat_request(), timeout=60))
    assert handed_off.token_ids == local.token_ids and handed_off.text == local.text
    assert len(handed_off.token_ids) == 24

    call = env.stub.Generate(chat_request(200), timeout=60)
    next(call), next(call), next(call)
    call.cancel()
    wait_for(lambda: no_blocks_held(real_workers), timeout_s=10, what="workers idle with no blocks held")


def test_migration_after_a_decode_worker_dies(real_env, real_workers):
    env = real_env
    expected = Stream(env.generate(chat_request(40), timeout=60))
    call = env.stub.Generate(chat_request(40), timeout=60)
    responses = [next(call) for _ in range(6)]
    victim = next(w for w in real_workers[1:] if w.stats().num_running)
    # Die now: WorkerServer.stop() would let the stream finish within its grace period.
    asyncio.run_coroutine_threadsafe(victim._server.stop(None), victim._aio_loop).result(10)
    victim.stop()
    victim.info = None  # gone from the registry
    responses += list(call)
    out = Stream(responses)
    assert out.complete.timings.num_migrations == 1
    assert out.token_ids == expected.token_ids and out.text == expected.text
    time.sleep(0.1)
    wait_for(lambda: no_blocks_held(real_workers), timeout_s=10, what="workers idle with no blocks held")
