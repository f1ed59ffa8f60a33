"""Traces and the router's metrics: one trace per request across the router and the workers, and the GenAI
histograms and router counters in the router's Prometheus text."""
from __future__ import annotations

import dataclasses
import json
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families

from router.convert import generate_input_from_proto
from router.metrics import DURATION_BUCKETS_S, TOKEN_BUCKETS, TPOT_BUCKETS_S, TTFT_BUCKETS_S
from router.request import GenerateCall
from tandem.telemetry import Telemetry
from tandem.v1 import generation_pb2 as pb
from tests.router.conftest import real_router_env, wait_for
from tests.router.helpers import Stream, text_request
from tests.servers import worker_servers

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tandem-dashboard.json"
# Long enough (> max_local_prefill_length=64 tokens) to be prefilled on the prefill worker.
LONG_PROMPT = ("In a quiet valley between two rivers there was a village of potters. Every spring they dug clay "
               "from the banks, every summer they fired their kilns through the short nights, and every autumn "
               "they loaded their carts and drove to the market town beyond the hills, where merchants from the "
               "coast paid in salt, cloth and stories. Tell the story of the youngest potter's first journey.")


def samples(text: bytes) -> list:
    return [s for family in text_string_to_metric_families(text.decode()) for s in family.samples]


def value(text: bytes, name: str, **labels) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    found = [s.value for s in samples(text) if s.name == name and labels.items() <= s.labels.items()]
    assert found, f"{name}{labels} is not in the metrics"
    return sum(found)


def bucket_bounds(text: bytes, name: str) -> list[float]:
    return sorted({float(s.labels["le"]) for s in samples(text) if s.name == f"{name}_bucket"})


# --- router metrics, against fake workers ----------------------------------------------------------------------


def test_router_exposes_genai_metrics_and_request_counters(make_env):
    env = make_env(prefill=1, decode=1)
    for _ in range(2):
        assert Stream(env.generate(text_request(max_tokens=5))).complete.finish_reason == pb.FINISH_REASON_LENGTH
    env.by_role("prefill")[0].prefill_error = (grpc.StatusCode.INTERNAL, "boom")
    with pytest.raises(grpc.RpcError) as failed:
        env.generate(text_request(max_tokens=5))
    assert failed.value.code() == grpc.StatusCode.INTERNAL

    text, content_type = env.router.telemetry.metrics_text()
    assert content_type.startswith("text/plain")
    inf = float("inf")
    assert bucket_bounds(text, "gen_ai_server_time_to_first_token_seconds") == [*TTFT_BUCKETS_S, inf]
    assert 'le="0.001"' in text.decode() and 'le="81.92"' in text.decode()
    assert bucket_bounds(text, "gen_ai_server_time_per_output_token_seconds") == [*TPOT_BUCKETS_S, inf]
    assert bucket_bounds(text, "gen_ai_server_request_duration_seconds") == pytest.approx([*DURATION_BUCKETS_S, inf])
    assert bucket_bounds(text, "gen_ai_client_token_usage") == [*TOKEN_BUCKETS, inf]

    genai = {"gen_ai_operation_name": "text_completion", "gen_ai_provider_name": "tandem",
             "gen_ai_request_model": env.model.name}
    assert value(text, "gen_ai_server_time_to_first_token_seconds_count", **genai) == 2
    assert value(text, "gen_ai_server_time_per_output_token_seconds_count", **genai) == 2
    assert value(text, "gen_ai_server_request_duration_seconds_count", **genai) == 3
    assert value(text, "gen_ai_server_request_duration_seconds_count", error_type="INTERNAL") == 1
    prompt_len = len(env.model.tokenizer.encode(text_request().text, add_special_tokens=True))
    # The failed request reached a prefill worker: its input tokens count, it made no output.
    assert value(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="input") == 3 * prompt_len
    assert value(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == 10
    assert value(text, "tandem_router_requests_total", status="success", finish_reason="length") == 2
    assert value(text, "tandem_router_requests_total", status="error", error_type="INTERNAL") == 1
    assert value(text, "tandem_router_inflight_requests") == 0
    assert value(text, "tandem_router_queued_requests", pool="prefill") == 0
    assert value(text, "tandem_router_queued_requests", pool="decode") == 0
    assert value(text, "tandem_router_migrations_total") == 0


def test_router_counts_migrations(make_env):
    env = make_env(prefill=1, decode=2)
    for w in env.by_role("decode"):
        w.decode_error, w.decode_error_after = (grpc.StatusCode.UNAVAILABLE, "gone"), 2
    env.by_role("decode")[1].decode_error = None  # the second one works
    env.by_role("decode")[0].stats.num_free_blocks = 2000  # the first one is picked first
    wait_for(lambda: env.router.pool.workers[env.by_role("decode")[0].worker_id].stats.num_free_blocks == 2000)
    out = Stream(env.generate(text_request(max_tokens=6)))
    assert out.complete.timings.num_migrations == 1
    assert value(env.router.telemetry.metrics_text()[0], "tandem_router_migrations_total") == 1


def test_router_span_continues_the_callers_trace(make_env):
    env = make_env(prefill=1, decode=1)
    exporter = InMemorySpanExporter()
    services = dataclasses.replace(env.router.services, telemetry=Telemetry("tandem-router", span_exporter=exporter))
    inp = generate_input_from_proto(text_request(max_tokens=3), "req-traced", env.model)
    sent: list[pb.GenerateResponse] = []

    async def send(msg):
        sent.append(msg)

    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    call = GenerateCall(services, inp, send, lambda: None, time.perf_counter(), operation="chat",
                        trace_carrier={"traceparent": f"00-{trace_id}-{parent_id}-01", "user-agent": "grpc"})
    env.aio.run(call.run())
    assert sent[-1].complete.usage.completion_tokens == 3

    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"router", "queue"}  # fake workers make no spans
    router, queue = spans["router"], spans["queue"]
    assert router.kind == SpanKind.SERVER
    assert router.context.trace_id == int(trace_id, 16) and router.parent.span_id == int(parent_id, 16)
    assert queue.parent.span_id == router.context.span_id and queue.context.trace_id == router.context.trace_id
    assert router.start_time <= queue.start_time <= queue.end_time <= router.end_time
    attrs = router.attributes
    assert attrs["gen_ai.request.id"] == "req-traced" and attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.usage.completion_tokens"] == 3 and attrs["gen_ai.request.max_tokens"] == 3
    assert 0 < attrs["gen_ai.latency.time_to_first_token"] <= attrs["gen_ai.latency.e2e"]
    assert router.status.status_code == StatusCode.UNSET


def test_failed_request_marks_its_span(make_env):
    env = make_env(prefill=1, decode=1)
    exporter = InMemorySpanExporter()
    services = dataclasses.replace(env.router.services, telemetry=Telemetry("tandem-router", span_exporter=exporter))
    env.by_role("prefill")[0].prefill_error = (grpc.StatusCode.INVALID_ARGUMENT, "prompt: too long")

    async def send(msg):
        pass

    inp = generate_input_from_proto(text_request(max_tokens=3), "req-failed", env.model)
    call = GenerateCall(services, inp, send, lambda: None, time.perf_counter())
    with pytest.raises(Exception):
        env.aio.run(call.run())
    [router] = [s for s in exporter.get_finished_spans() if s.name == "router"]
    assert router.parent is None  # no caller context: a new trace
    assert router.status.status_code == StatusCode.ERROR
    assert router.attributes["error.type"] == "INVALID_ARGUMENT"


# --- one trace across a router and real workers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def traced(aio, served_model):
    """A router, a prefill and a decode worker (real engines), all exporting spans to one exporter; after a
    disaggregated request and the same prompt again (prefilled on the decode worker from its prefix cache)."""
    exporter = InMemorySpanExporter()
    with worker_servers(("prefill", "decode"), lambda: Telemetry("tandem-worker", span_exporter=exporter)) as workers:
        # A generous MatchPrefix timeout: the second request must see the decode worker's cache.
        env = real_router_env(aio, served_model, workers, telemetry=Telemetry("tandem-router", span_exporter=exporter),
                              match_prefix_timeout_s=5.0)
        try:
            streams = {}
            for request_id in ("disaggregated", "local"):
                request = pb.GenerateRequest(request_id=request_id, text=LONG_PROMPT, sampling=pb.SamplingParams(
                    temperature=0.0, max_tokens=8, ignore_eos=True))
                streams[request_id] = Stream(env.generate(request, timeout=60))
            yield env, workers, exporter, streams
        finally:
            env.close()


def trace_of(exporter: InMemorySpanExporter, request_id: str, names: set[str]) -> dict:
    """The spans of the request's trace by name, once `names` have all ended (each exactly once)."""
    def spans():
        finished = exporter.get_finished_spans()
        roots = [s for s in finished if s.name == "router" and s.attributes["gen_ai.request.id"] == request_id]
        if not roots:
            return []
        return [s for s in finished if s.context.trace_id == roots[0].context.trace_id]

    wait_for(lambda: {s.name for s in spans()} >= names, timeout_s=10, what=f"spans {names} of {request_id}")
    found = spans()
    assert sorted(s.name for s in found) == sorted(names), [s.name for s in found]
    return {s.name: s for s in found}


SLACK_NS = 5_000_000  # spans from different clocks (perf_counter, monotonic) converted to epoch time


def ordered(*times_ns: int) -> bool:
    return all(a <= b + SLACK_NS for a, b in zip(times_ns, times_ns[1:]))


@pytest.mark.slow
def test_disaggregated_request_is_one_trace_across_router_and_workers(traced):
    env, (prefill_worker, decode_worker), exporter, streams = traced
    out = streams["disaggregated"]
    assert out.complete.timings.kv_transfer_ms > 0, "the request was not disaggregated"
    spans = trace_of(exporter, "disaggregated", {"router", "queue", "prefill", "kv_transfer", "decode"})
    router = spans["router"]
    assert router.parent is None and router.kind == SpanKind.SERVER
    for name in ("queue", "prefill", "kv_transfer", "decode"):
        assert spans[name].parent.span_id == router.context.span_id, name
    prefill, kv, decode, queue = spans["prefill"], spans["kv_transfer"], spans["decode"], spans["queue"]
    assert prefill.attributes["tandem.worker.id"] == prefill_worker.worker_id
    assert kv.attributes["tandem.worker.id"] == decode_worker.worker_id
    assert decode.attributes["tandem.worker.id"] == decode_worker.worker_id
    assert ordered(router.start_time, queue.start_time, queue.end_time, prefill.start_time, prefill.end_time,
                   kv.start_time, kv.end_time, decode.start_time, decode.end_time, router.end_time)

    prompt_len = out.complete.usage.prompt_tokens
    assert prompt_len >= 64
    attrs = router.attributes
    assert attrs["gen_ai.request.model"] == env.model.name and attrs["gen_ai.request.max_tokens"] == 8
    assert attrs["gen_ai.request.temperature"] == 0.0 and attrs["gen_ai.request.top_p"] == 1.0
    assert attrs["gen_ai.usage.prompt_tokens"] == prompt_len and attrs["gen_ai.usage.completion_tokens"] == 8
    assert 0 < attrs["gen_ai.latency.time_to_first_token"] <= attrs["gen_ai.latency.e2e"]
    assert attrs["gen_ai.latency.time_in_queue"] >= 0
    assert attrs["gen_ai.response.finish_reasons"] == ("length",)
    assert prefill.attributes["gen_ai.usage.prompt_tokens"] == prompt_len
    assert prefill.attributes["gen_ai.latency.time_in_model_prefill"] > 0
    assert kv.attributes["tandem.kv_transfer.bytes"] > 0 and kv.attributes["tandem.kv_transfer.transport"] == "tcp"
    assert kv.attributes["tandem.kv_transfer.prefill_tp_size"] == kv.attributes["tandem.kv_transfer.decode_tp_size"] == 1
    assert kv.attributes["tandem.kv_transfer.source_worker_id"] == prefill_worker.worker_id
    assert decode.attributes["gen_ai.usage.completion_tokens"] == 7  # the first came from the prefill worker
    for span in spans.values():
        assert span.status.status_code == StatusCode.UNSET, span.name


@pytest.mark.slow
def test_locally_prefilled_request_has_no_kv_transfer_span(traced):
    env, (prefill_worker, decode_worker), exporter, streams = traced
    assert streams["local"].complete.timings.kv_transfer_ms == 0, "the repeated prompt was not prefilled locally"
    spans = trace_of(exporter, "local", {"router", "queue", "prefill", "decode"})
    assert spans["prefill"].attributes["tandem.worker.id"] == decode_worker.worker_id
    assert spans["prefill"].attributes["tandem.num_cached_tokens"] > 0
    assert spans["decode"].attributes["gen_ai.usage.completion_tokens"] == 8
    assert ordered(spans["prefill"].end_time, spans["decode"].start_time, spans["decode"].end_time,
                   spans["router"].end_time)
    assert streams["local"].token_ids == streams["disaggregated"].token_ids


@pytest.mark.slow
def test_dashboard_queries_only_metrics_that_exist(traced):
    env, workers, exporter, streams = traced
    texts = [env.router.telemetry.metrics_text()[0].decode()]
    for w in workers:
        with urllib.request.urlopen(f"http://{w.info.metrics_address}/metrics", timeout=10) as resp:
            texts.append(resp.read().decode())
    exposed = {s.name for text in texts for family in text_string_to_metric_families(text) for s in family.samples}

    dashboard = json.loads(DASHBOARD.read_text())
    assert any(v["type"] == "datasource" and v["query"] == "prometheus"
               for v in dashboard["templating"]["list"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    used = {name for expr in exprs for name in re.findall(r"\b(?:tandem|gen_ai)_[a-z0-9_]+", metric_names_part(expr))}
    assert len(used) >= 15
    assert used <= exposed, sorted(used - exposed)


def metric_names_part(expr: str) -> str:
    """A PromQL expression without its label matchers and by/without groupings, which name labels, not metrics."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    return re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", expr)
