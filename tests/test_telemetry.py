"""Telemetry: exporters per process, trace context through carriers, /metrics over HTTP."""
from __future__ import annotations

import asyncio
import urllib.request

from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tandem.telemetry import Telemetry, extract, inject, start_metrics_server


def test_otlp_endpoint_builds_otlp_exporters_without_connecting():
    # Nothing listens there: building must not wait on the network.
    telemetry = Telemetry("tandem-test", otlp_endpoint="http://127.0.0.1:9")
    assert telemetry.otlp_endpoint == "http://127.0.0.1:9"
    [processor] = telemetry.span_processors
    assert isinstance(processor, BatchSpanProcessor) and isinstance(processor.span_exporter, OTLPSpanExporter)
    [otlp_reader] = [r for r in telemetry.metric_readers if isinstance(r, PeriodicExportingMetricReader)]
    assert isinstance(otlp_reader._exporter, OTLPMetricExporter)
    telemetry.shutdown()  # nothing recorded: nothing to send


def test_otlp_is_off_without_an_endpoint(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    telemetry = Telemetry("tandem-test")
    assert telemetry.otlp_endpoint is None
    assert not telemetry.span_processors
    assert not [r for r in telemetry.metric_readers if isinstance(r, PeriodicExportingMetricReader)]


def test_otlp_endpoint_from_the_environment(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    assert Telemetry("tandem-test").otlp_endpoint == "http://127.0.0.1:9"


def test_context_crosses_processes_in_metadata():
    exporter = InMemorySpanExporter()
    caller, callee = Telemetry("a", span_exporter=exporter), Telemetry("b", span_exporter=exporter)
    parent = caller.tracer.start_span("router")
    metadata = inject(parent)
    assert [k for k, _ in metadata] == ["traceparent"]
    child = callee.tracer.start_span("decode", context=extract(metadata))
    child.end()
    parent.end()
    assert child.parent.span_id == parent.context.span_id
    assert child.context.trace_id == parent.context.trace_id
    # No traceparent (or none at all): a new root.
    assert extract({"user-agent": "grpc-python"}) is None and extract(None) is None
    assert extract({"Traceparent": dict(metadata)["traceparent"]}) is not None  # HTTP headers keep their case


def test_processes_keep_separate_metrics():
    a, b = Telemetry("a"), Telemetry("b", metric_readers=[reader := InMemoryMetricReader()])
    a.meter.create_counter("tandem.only_in_a").add(1)
    b.meter.create_counter("tandem.only_in_b").add(2)
    assert b"tandem_only_in_a_total" in a.metrics_text()[0] and b"tandem_only_in_b" not in a.metrics_text()[0]
    names = [m.name for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
             for m in sm.metrics]
    assert names == ["tandem.only_in_b"]


def test_instruments_are_built_once_per_process():
    telemetry = Telemetry("a")
    calls = []

    def factory(meter):
        calls.append(meter)
        return object()

    assert telemetry.instruments(factory) is telemetry.instruments(factory)
    assert len(calls) == 1


def test_metrics_server_serves_the_registry():
    telemetry = Telemetry("a")
    telemetry.meter.create_counter("tandem.served").add(3)

    async def serve_and_scrape():
        runner, address = await start_metrics_server(telemetry, "127.0.0.1", 0)
        try:
            def scrape():
                with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
                    return resp.headers["Content-Type"], resp.read().decode()
            return address, *await asyncio.to_thread(scrape)
        finally:
            await runner.cleanup()

    address, content_type, text = asyncio.run(serve_and_scrape())
    assert address.startswith("127.0.0.1:") and not address.endswith(":0")
    assert content_type.startswith("text/plain")
    assert "tandem_served_total" in text
