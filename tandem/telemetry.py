"""OpenTelemetry for one tandem process (a router or a worker): its tracer, its meter and its Prometheus text.

Each process builds one `Telemetry` and passes it to what it serves; nothing here installs global providers, so
tests can run several routers and workers in one process, each with its own exporters.

Exporters:
  - Prometheus: always; `metrics_text()` renders this process's metrics for a `/metrics` endpoint
    (`start_metrics_server` serves it over HTTP where the process has no HTTP server of its own).
  - OTLP (gRPC) for traces and metrics: on when OTEL_EXPORTER_OTLP_ENDPOINT is set (the exporters read the rest of
    the standard OTEL_EXPORTER_OTLP_* variables themselves), off otherwise.
  - Tests pass `span_exporter` (an InMemorySpanExporter) and `metric_readers` (an InMemoryMetricReader).

Trace context crosses processes as W3C `traceparent`/`tracestate` in gRPC metadata: `inject` before a call,
`extract` in the handler.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from opentelemetry.context import Context
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Span, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
SCOPE = "tandem"
# Stateless: reads and writes only the carrier it is given.
_PROPAGATOR = TraceContextTextMapPropagator()

T = TypeVar("T")


class Telemetry:
    """The tracer and meter of one process (`service_name`: "tandem-router", "tandem-worker")."""

    def __init__(self, service_name: str, *, span_exporter: SpanExporter | None = None,
                 metric_readers: Sequence[MetricReader] = (), otlp_endpoint: str | None = None,
                 resource_attributes: dict[str, str] | None = None):
        if otlp_endpoint is None:
            otlp_endpoint = os.environ.get(OTLP_ENDPOINT_ENV) or None
        self.otlp_endpoint = otlp_endpoint
        resource = Resource.create({SERVICE_NAME: service_name, **(resource_attributes or {})})
        self.registry = CollectorRegistry(auto_describe=True)
        readers: list[MetricReader] = [PrometheusMetricReader(registry=self.registry), *metric_readers]
        # Where spans go: synchronously to a test's exporter, in batches (off the request path) to OTLP.
        processors: list[SpanProcessor] = []
        if span_exporter is not None:
            processors.append(SimpleSpanProcessor(span_exporter))
        if otlp_endpoint:
            # Neither exporter connects until its first export: building them never waits on the network.
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            processors.append(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp_endpoint)))
        self.span_processors: tuple[SpanProcessor, ...] = tuple(processors)
        self.metric_readers: tuple[MetricReader, ...] = tuple(readers)
        self.tracer_provider = TracerProvider(resource=resource)
        for processor in processors:
            self.tracer_provider.add_span_processor(processor)
        self.meter_provider = MeterProvider(metric_readers=readers, resource=resource)
        self.tracer = self.tracer_provider.get_tracer(SCOPE)
        self.meter = self.meter_provider.get_meter(SCOPE)
        self._instruments: dict[Callable, object] = {}

    def instruments(self, factory: Callable[[Meter], T]) -> T:
        """`factory(self.meter)`, built once per process: a component's instrument set, shared by its requests."""
        found = self._instruments.get(factory)
        if found is None:
            found = self._instruments[factory] = factory(self.meter)
        return found

    def metrics_text(self) -> tuple[bytes, str]:
        """This process's metrics in the Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def shutdown(self) -> None:
        """Flushes the exporters (OTLP batches) and stops them."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


# --- trace context across processes ------------------------------------------------------------------------


def inject(span: Span) -> tuple[tuple[str, str], ...]:
    """gRPC call metadata carrying `span` as the remote parent (`traceparent`, and `tracestate` when set)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=set_span_in_context(span))
    return tuple(carrier.items())


def extract(carrier: Mapping[str, str] | Sequence[tuple[str, str]] | None) -> Context | None:
    """The caller's context from gRPC metadata or HTTP headers; None (a new root) when they carry none."""
    if not carrier:
        return None
    if not isinstance(carrier, Mapping):
        carrier = {key: value for key, value in carrier}
    # gRPC metadata keys are lower case already; HTTP headers may not be.
    carrier = {key.lower(): value for key, value in carrier.items() if isinstance(value, str)}
    if "traceparent" not in carrier:
        return None
    return _PROPAGATOR.extract(carrier)


# --- clocks: spans take epoch nanoseconds, the engine and router keep monotonic seconds ---------------------


# Each clock's offset to the epoch, read once: converting with one fixed offset keeps the order of readings, so a
# child span converted later never starts before its parent converted earlier (the clocks tick at the same rate;
# NTP slews the wall clock by parts per million).
_MONOTONIC_EPOCH_NS = time.time_ns() - time.monotonic_ns()
_PERF_COUNTER_EPOCH_NS = time.time_ns() - time.perf_counter_ns()


def epoch_ns_from_monotonic(t: float) -> int:
    """A `time.monotonic()` reading as span time (ns since the epoch)."""
    return _MONOTONIC_EPOCH_NS + int(t * 1e9)


def epoch_ns_from_perf_counter(t: float) -> int:
    """A `time.perf_counter()` reading as span time (ns since the epoch)."""
    return _PERF_COUNTER_EPOCH_NS + int(t * 1e9)


# --- /metrics over HTTP ------------------------------------------------------------------------------------


def metrics_handler(telemetry: Telemetry):
    """An aiohttp handler for `GET /metrics` that renders `telemetry`'s metrics."""
    from aiohttp import web

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = telemetry.metrics_text()
        return web.Response(body=body, headers={"Content-Type": content_type})

    return metrics


async def start_metrics_server(telemetry: Telemetry, host: str, port: int):
    """Serve `GET /metrics` on the running event loop (aiohttp); returns (runner, "host:port" bound).

    Port 0 picks a free port. Stop it with `await runner.cleanup()`.
    """
    from aiohttp import web

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler(telemetry))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    shown_host = f"[{host}]" if ":" in host else host
    return runner, f"{shown_host}:{bound_port}"
