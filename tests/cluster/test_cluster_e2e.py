"""End to end: a real local cluster (Ray, one prefill and two decode workers in their own processes, a router)
called over real gRPC. Compared with the offline engine, hit with bad input, cancelled, and a decode worker is
killed mid-stream."""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
import pytest

from tandem.v1 import generation_pb2 as pb
from tandem.v1 import generation_pb2_grpc
from tandem.v1 import worker_pb2 as wpb
from tests.workers.prompts import CHAT_PROMPTS, RAW_PROMPTS

pytestmark = pytest.mark.slow

# Small enough for three workers on two cores; large enough for the long prompts.
ENGINE = dict(max_num_seqs=32, kv_cache_memory_bytes=256 << 20)


class _LoopThread:
    """An asyncio loop on a background thread, for the router under test."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def cluster():
    from cluster.config import ClusterConfig
    from cluster.controller import Controller
    from router.config import RouterConfig
    from router.server import Router

    controller = Controller(ClusterConfig(num_prefill_workers=1, num_decode_workers=2, engine=ENGINE,
                                          health_check_period_s=0.5))
    loops = _LoopThread()
    routers = []
    try:
        registry = controller.start()

        def start_router(**options):
            router = Router(RouterConfig(port=0, http_port=0, registry_address=registry, **options))
            address = loops.run(router.start())
            loops.run(router.wait_ready(timeout_s=60))
            routers.append(router)
            return router, address

        yield controller, start_router, loops
    finally:
        for router in routers:
            loops.run(router.stop(grace_s=1))
        loops.close()
        controller.stop()


@pytest.fixture(scope="module")
def router_address(cluster):
    # max_local_prefill_length=0: every prompt goes through the prefill worker and a KV transfer.
    _, address = cluster[1](max_local_prefill_length=0)
    return address


@pytest.fixture(scope="module")
def stub(router_address):
    channel = grpc.insecure_channel(router_address)
    yield generation_pb2_grpc.GenerationStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def offline():
    from workers import LLM

    llm = LLM(**ENGINE)
    yield llm
    llm.shutdown()


def _generate(stub, req, timeout=120):
    tokens, text, complete = [], "", None
    for resp in stub.Generate(req, timeout=timeout):
        if resp.HasField("chunk"):
            tokens += resp.chunk.token_ids
            text += resp.chunk.text
        else:
            complete = resp.complete
    return tokens, text, complete


def _greedy(max_tokens, **kw):
    return pb.SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def _wait_all_free(controller, timeout=30) -> list[wpb.WorkerStats]:
    deadline = time.monotonic() + timeout
    while True:
        stats = controller.worker_stats()
        if all(s.num_used_blocks == 0 and s.num_kv_held == 0 and s.num_running == 0 for s in stats):
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def test_greedy_matches_offline_engine(cluster, stub, offline):
    from workers import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=24)
    for prompt in RAW_PROMPTS:
        expected = offline.generate([prompt], params)[0]
        tokens, text, complete = _generate(stub, pb.GenerateRequest(text=prompt, sampling=_greedy(24)))
        assert tokens == expected.token_ids, prompt[:40]
        assert text == expected.text
        assert complete.usage.prompt_tokens == len(expected.prompt_token_ids)
        assert complete.usage.completion_tokens == len(tokens)
        assert complete.timings.kv_transfer_ms > 0  # it really went prefill -> KV -> decode
        assert complete.timings.first_token_ms > 0
    conv = CHAT_PROMPTS[0]
    expected = offline.chat(conv, params)[0]
    req = pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in conv]), sampling=_greedy(24))
    tokens, _, _ = _generate(stub, req)
    assert tokens == expected.token_ids
    ids = offline.tokenizer.encode(RAW_PROMPTS[0])
    tokens, _, _ = _generate(stub, pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=_greedy(24)))
    assert tokens == offline.generate([ids], params)[0].token_ids
    # Prefill and decode both served: the decode side received KV over the transport.
    stats = cluster[0].worker_stats()
    assert sum(s.kv_transfers for s in stats if s.info.role == "decode") >= len(RAW_PROMPTS) + 2


def test_32_concurrent_streams_complete(stub):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        req = pb.GenerateRequest(text=f"Request {i}: list three colours.", sampling=_greedy(16, ignore_eos=True))
        return _generate(stub, req)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for tokens, _, complete in results:
        assert complete.finish_reason == pb.FINISH_REASON_LENGTH
        assert len(tokens) == 16 == complete.usage.completion_tokens


def _code(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def test_bad_input_gets_status_and_message(cluster, stub, offline):
    code, msg = _code(lambda: _generate(stub, pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(temperature=-1))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in msg
    code, msg = _code(lambda: _generate(stub, pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(top_p=1.5))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in msg
    code, msg = _code(lambda: _generate(stub, pb.GenerateRequest(sampling=_greedy(4))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "input" in msg
    too_long = pb.TokenIds(ids=[42] * (offline.engine.max_model_len + 1))
    code, msg = _code(lambda: _generate(stub, pb.GenerateRequest(token_ids=too_long, sampling=_greedy(4))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in msg.lower()
    code, msg = _code(lambda: _generate(stub, pb.GenerateRequest(text="hi", model="no-such-model")))
    assert code == grpc.StatusCode.NOT_FOUND and "model" in msg
    # A deadline that cannot be met.
    code, _ = _code(lambda: _generate(stub, pb.GenerateRequest(text="Count to a thousand:",
                                                               sampling=_greedy(500, ignore_eos=True)), timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server keeps serving, and the expired request left nothing behind.
    tokens, _, _ = _generate(stub, pb.GenerateRequest(text="hi", sampling=_greedy(4, ignore_eos=True)))
    assert len(tokens) == 4
    stats = _wait_all_free(cluster[0])
    assert all(s.num_used_blocks == 0 and s.num_kv_held == 0 for s in stats), stats


def test_queue_full_is_resource_exhausted(cluster):
    _, address = cluster[1](max_queued_requests=1, max_local_prefill_length=0)
    with grpc.insecure_channel(address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        req = pb.GenerateRequest(text=RAW_PROMPTS[3], sampling=_greedy(8))
        calls = [stub.Generate(req, timeout=120) for _ in range(6)]
        codes = []
        for call in calls:
            try:
                list(call)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    assert "max_queued_requests" in e.details() or "queue" in e.details()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert grpc.StatusCode.OK in codes


def test_draining_router_is_unavailable(cluster):
    """While draining, new requests get UNAVAILABLE and the in-flight one finishes."""
    router, address = cluster[1]()
    with grpc.insecure_channel(address) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        call = stub.Generate(pb.GenerateRequest(text="Tell me a story.", sampling=_greedy(48, ignore_eos=True)), timeout=120)
        tokens = list(next(call).chunk.token_ids)
        stopping = asyncio.run_coroutine_threadsafe(router.stop(grace_s=60), cluster[2].loop)
        time.sleep(0.5)
        code, _ = _code(lambda: _generate(stub, pb.GenerateRequest(text="hi"), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE
        complete = None
        for resp in call:
            if resp.HasField("chunk"):
                tokens += resp.chunk.token_ids
            else:
                complete = resp.complete
        assert complete.finish_reason == pb.FINISH_REASON_LENGTH and len(tokens) == 48
        stopping.result(60)


def test_cancelled_stream_frees_blocks_on_both_workers(cluster, stub):
    controller = cluster[0]
    req = pb.GenerateRequest(text=RAW_PROMPTS[3], sampling=_greedy(400, ignore_eos=True))
    call = stub.Generate(req, timeout=120)
    seen = 0
    for resp in call:
        seen += len(resp.chunk.token_ids)
        if seen >= 3:
            break
    busy = controller.worker_stats()
    assert sum(s.num_used_blocks for s in busy if s.info.role == "decode") > 0
    call.cancel()
    stats = _wait_all_free(controller)
    for s in stats:
        assert s.num_used_blocks == 0, s
        assert s.num_kv_held == 0, s
        assert s.num_running == 0 and s.num_waiting == 0, s


def test_decode_worker_killed_mid_stream_migrates(cluster, stub, offline):
    """Last: it kills a worker. The stream continues on the other decode worker, and the dead one is replaced."""
    from workers import SamplingParams

    controller = cluster[0]
    prompt = RAW_PROMPTS[2]
    expected = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=96, ignore_eos=True))[0]
    before = {w.worker_id for w in controller.workers()}
    call = stub.Generate(pb.GenerateRequest(text=prompt, sampling=_greedy(96, ignore_eos=True)), timeout=180)
    tokens, text, complete, killed = [], "", None, None
    for resp in call:
        if resp.HasField("chunk"):
            tokens += resp.chunk.token_ids
            text += resp.chunk.text
            if killed is None and len(tokens) >= 8:
                busy = [s for s in controller.worker_stats() if s.info.role == "decode" and s.num_running > 0]
                assert len(busy) == 1
                killed = busy[0].info
                os.kill(killed.pid, signal.SIGKILL)
        else:
            complete = resp.complete
    assert killed is not None
    assert tokens == expected.token_ids
    assert text == expected.text
    assert complete.finish_reason == pb.FINISH_REASON_LENGTH
    assert complete.timings.num_migrations >= 1
    # The controller notices, drops the dead worker from the registry and starts a replacement.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        now = {w.worker_id: w for w in controller.workers()}
        if killed.worker_id not in now and sum(w.role == "decode" for w in now.values()) == 2:
            break
        time.sleep(1)
    now = {w.worker_id: w for w in controller.workers()}
    assert killed.worker_id not in now
    assert sum(w.role == "decode" for w in now.values()) == 2
    assert set(now) - before  # a new worker id
    tokens, _, _ = _generate(stub, pb.GenerateRequest(text=prompt, sampling=_greedy(16, ignore_eos=True)))
    assert tokens == expected.token_ids[:16]
