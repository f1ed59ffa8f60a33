"""OpenTelemetry for one tandem process (a router or a worker): its tracer, its meter and its Prometheus text.

Each process builds one `Telemetry` and passes it to what it serves; nothing here installs global providers, so
tests can run several routers and workers in one process, each with its own exporters.

Exporters:
  - Prometheus: always; `metrics_text()` renders this process's metrics for a `/metrics` endpoint.
  - OTLP (gRPC) for traces and metrics: on when OTEL_EXPORTER_OTLP_ENDPOINT is set (the exporters read the rest of
    the standard OTEL_EXPORTER_OTLP_* variables themselves), off otherwise.
  - Tests pass `span_exporter` (an InMemorySpanExporter) and `metric_readers` (an InMemoryMetricReader).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
SCOPE = "tandem"


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
        self.tracer_provider = TracerProvider(resource=resource)
        if span_exporter is not None:
            self.tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        if otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            self.tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp_endpoint)))
        self.meter_provider = MeterProvider(metric_readers=readers, resource=resource)
        self.tracer = self.tracer_provider.get_tracer(SCOPE)
        self.meter = self.meter_provider.get_meter(SCOPE)

    def metrics_text(self) -> tuple[bytes, str]:
        """This process's metrics in the Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def shutdown(self) -> None:
        """Flushes the exporters (OTLP batches) and stops them."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
