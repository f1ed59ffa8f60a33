"""A worker's Prometheus `/metrics` over HTTP: engine and KV transfer metrics move with the work done, and its
address is in WorkerInfo. Drives a prefill and a decode WorkerServer (real engines) over gRPC, no router."""
from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tandem.v1 import generation_pb2 as pb
from tandem.v1 import worker_pb2 as wpb
from tandem.v1 import worker_pb2_grpc
from tests.servers import worker_servers

pytestmark = pytest.mark.slow

PROMPT = list(range(1000, 1100))  # 100 tokens: several full blocks, for prefix-cache hits


@pytest.fixture(scope="module")
def workers():
    with worker_servers(("prefill", "decode")) as servers:
        yield servers


def stub(server) -> worker_pb2_grpc.WorkerStub:
    return worker_pb2_grpc.WorkerStub(grpc.insecure_channel(server.info.address))


def engine_request(request_id: str, max_tokens: int = 6) -> wpb.EngineRequest:
    return wpb.EngineRequest(request_id=request_id, prompt_token_ids=PROMPT,
                             sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


def scrape(server) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://{server.info.metrics_address}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict, name: str, **labels) -> float:
    found = [v for (n, ls), v in metrics.items() if n == name and labels.items() <= dict(ls).items()]
    assert found, f"{name}{labels} is not in the metrics"
    return sum(found)


def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_metrics_move_with_disaggregated_and_cached_requests(workers):
    prefill, decode = workers
    assert prefill.info.metrics_address and decode.info.metrics_address != prefill.info.metrics_address
    before = scrape(decode)
    assert value(before, "tandem_generation_tokens_total") == 0
    assert value(before, "tandem_kv_cache_usage_perc") == 0

    # Disaggregated: prefill here, pull the KV there, decode there.
    first = stub(prefill).Prefill(wpb.PrefillRequest(request=engine_request("m-1")), timeout=60)
    assert first.kv.num_bytes > 0
    decoded = list(stub(decode).Decode(wpb.DecodeRequest(request=engine_request("m-1"), kv=first.kv), timeout=60))
    assert decoded[-1].finish_reason == pb.FINISH_REASON_LENGTH
    # The same prompt again on the decode worker: its blocks are in the prefix cache now.
    again = list(stub(decode).Decode(wpb.DecodeRequest(request=engine_request("m-2")), timeout=60))
    assert again[0].num_cached_tokens > 0

    # The engine thread snapshots its counters right after the step whose tokens it sends.
    wait_until(lambda: value(scrape(decode), "tandem_request_success_total", finished_reason="length") == 2)
    p, d = scrape(prefill), scrape(decode)
    worker = {"worker_id": prefill.worker_id, "worker_role": "prefill"}
    assert value(p, "tandem_prompt_tokens_total", **worker) == len(PROMPT)
    assert value(p, "tandem_generation_tokens_total") == 1  # the first token
    assert value(p, "tandem_kv_transfer_stage_latency_seconds_count", kv_transport="tcp", prefill_tp_size="1") == 1
    assert value(p, "tandem_kv_transport_info", kv_transport="tcp", **worker) == 1
    # The sender counts a transfer once the receiver acknowledged it, which may land just after the pull.
    wait_until(lambda: value(scrape(prefill), "tandem_kv_transfer_bytes_total", direction="sent") == first.kv.num_bytes)

    assert value(d, "tandem_kv_transfer_bytes_total", direction="received") == first.kv.num_bytes
    assert value(d, "tandem_kv_transfers_total", direction="received") == 1
    hand_off = {"kv_transport": "tcp", "prefill_tp_size": "1", "decode_tp_size": "1"}
    assert value(d, "tandem_kv_transfer_latency_seconds_count", **hand_off) == 1
    latency_s = value(d, "tandem_kv_transfer_latency_seconds_sum", **hand_off)
    assert latency_s > 0
    assert value(d, "tandem_kv_transfer_size_bytes_count", **hand_off) == 1
    assert value(d, "tandem_kv_transfer_size_bytes_sum", **hand_off) == first.kv.num_bytes
    assert value(d, "tandem_kv_transfer_bandwidth_bytes_per_second_sum", **hand_off) == pytest.approx(
        first.kv.num_bytes / latency_s)
    assert value(d, "tandem_generation_tokens_total") == 5 + 6
    assert value(d, "tandem_prompt_tokens_total") == len(PROMPT)  # only the local prefill counts
    assert value(d, "tandem_prefix_cache_hits_total") > 0
    assert value(d, "tandem_prefix_cache_queries_total") >= value(d, "tandem_prefix_cache_hits_total")
    assert value(d, "tandem_request_success_total", finished_reason="length") == 2
    assert value(d, "tandem_num_requests_running") == 0 and value(d, "tandem_num_requests_waiting") == 0
    assert value(d, "tandem_num_preemptions_total") == 0

    stats = decode.stats()
    assert stats.num_generation_tokens == 11 and dict(stats.num_requests_finished) == {"length": 2}
    assert stats.info.metrics_address == decode.info.metrics_address


def test_aborted_request_counts_as_abort_and_handoff_does_not(workers):
    prefill, decode = workers
    first = stub(prefill).Prefill(wpb.PrefillRequest(request=engine_request("a-1")), timeout=60)
    # Never fetched: the router gives up on it.
    stub(prefill).Abort(wpb.AbortRequest(request_ids=["a-1"]), timeout=10)
    assert first.kv.num_bytes > 0
    wait_until(lambda: value(scrape(prefill), "tandem_num_kv_held") == 0)
    # Neither the fetched hand-off of the other test nor this withdrawn one finished on the prefill worker.
    assert not [k for k in scrape(prefill) if k[0] == "tandem_request_success_total"]


def test_metrics_port_off():
    from workers.server import WorkerConfig

    assert WorkerConfig(metrics_port=-1).metrics_port == -1
    with pytest.raises(ValueError, match="metrics_port"):
        WorkerConfig(metrics_port=-2)


def test_prefix_cache_counts_each_prompt_once_on_the_worker_that_prefills_it(workers):
    """Under KV pressure (requests wait for blocks and get preempted) each prompt is one query; a disaggregated
    request counts on its prefill worker, not on the decode worker that imports its KV."""
    import concurrent.futures

    prefill, decode = workers
    p0, d0 = scrape(prefill), scrape(decode)
    # Disaggregated, a fresh prompt: 100 tokens queried on the prefill worker, none on the decode worker.
    prompt = list(range(5000, 5100))
    request = wpb.EngineRequest(request_id="pc-1", prompt_token_ids=prompt,
                                sampling=pb.SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    first = stub(prefill).Prefill(wpb.PrefillRequest(request=request), timeout=60)
    list(stub(decode).Decode(wpb.DecodeRequest(request=request, kv=first.kv), timeout=60))
    wait_until(lambda: value(scrape(decode), "tandem_request_success_total", finished_reason="length")
               > value(d0, "tandem_request_success_total", finished_reason="length"))
    p1, d1 = scrape(prefill), scrape(decode)
    assert value(p1, "tandem_prefix_cache_queries_total") - value(p0, "tandem_prefix_cache_queries_total") == 100
    assert value(p1, "tandem_prefix_cache_hits_total") == value(p0, "tandem_prefix_cache_hits_total")
    assert value(d1, "tandem_prefix_cache_queries_total") == value(d0, "tandem_prefix_cache_queries_total")

    # Six 300-token prompts prefilled on the decode worker at once: ~2,700 tokens for a cache of ~1,400.
    prompts = [list(range(10_000 + 1000 * k, 10_300 + 1000 * k)) for k in range(6)]

    def run(k: int) -> list:
        req = wpb.EngineRequest(request_id=f"pc-load-{k}", prompt_token_ids=prompts[k],
                                sampling=pb.SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True))
        return list(stub(decode).Decode(wpb.DecodeRequest(request=req), timeout=300))

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        outs = list(pool.map(run, range(len(prompts))))
    assert all(out[-1].finish_reason == pb.FINISH_REASON_LENGTH for out in outs)
    wait_until(lambda: value(scrape(decode), "tandem_num_requests_running") == 0)
    d2 = scrape(decode)
    assert value(d2, "tandem_num_preemptions_total") > value(d1, "tandem_num_preemptions_total"), \
        "not under KV pressure"
    assert value(d2, "tandem_prefix_cache_queries_total") - value(d1, "tandem_prefix_cache_queries_total") == 6 * 300
    assert value(d2, "tandem_prefix_cache_hits_total") == value(d1, "tandem_prefix_cache_hits_total")


def test_a_prefills_own_kv_lease_ms_is_honoured(workers):
    prefill, decode = workers
    expired_before = prefill.stats().kv_leases_expired
    first = stub(prefill).Prefill(wpb.PrefillRequest(request=engine_request("lease-1"), kv_lease_ms=200), timeout=60)
    assert first.kv.num_bytes > 0
    wait_until(lambda: prefill.stats().kv_leases_expired == expired_before + 1, timeout_s=5)  # not the 30 s default
    with pytest.raises(grpc.RpcError) as e:
        list(stub(decode).Decode(wpb.DecodeRequest(request=engine_request("lease-1"), kv=first.kv), timeout=60))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and e.value.details().startswith("kv:")
    with pytest.raises(grpc.RpcError) as e:
        stub(prefill).Prefill(wpb.PrefillRequest(request=engine_request("lease-2"), kv_lease_ms=3_600_001), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == ("kv_lease_ms: must be <= 3600000 (an hour; 0: the worker's kv_lease_s), "
                                 "got 3600001")
