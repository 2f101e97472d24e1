"""OpenTelemetry for every service: a tracer provider of the service's own (service.name = ivl-gateway,
ivl-vision, ivl-llm), off unless an OTLP endpoint is configured, and the maintained gRPC instrumentation
(opentelemetry-instrumentation-grpc) as interceptors, which carries the trace context in gRPC metadata
(W3C `traceparent`) from the gateway to the vision and LLM services. grpc.health.v1 calls are not traced.

    provider = tracer_provider("ivl-llm", settings.otlp_traces_endpoint)   # None: tracing off
    server = new_aio_server(..., interceptors=[*server_interceptors(provider), ...])
    channel = grpc.aio.insecure_channel(address, interceptors=client_interceptors(provider))
    tracer = tracer_of(provider)   # a no-op tracer when off

Providers are passed explicitly (no global provider is installed), so several services in one process (the
tests) keep their own service names; tests pass `exporter=` (e.g. an InMemorySpanExporter).
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter


def tracer_provider(service_name: str, otlp_endpoint: str = "", exporter: SpanExporter | None = None) -> TracerProvider | None:
    """The service's provider exporting to `exporter` (as each span ends) or over OTLP/gRPC to `otlp_endpoint`
    (batched); None when neither is given (tracing off: no interceptors, no-op spans)."""
    if exporter is None and not otlp_endpoint:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    return provider


def _not_health() -> Any:
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.health_check())


def server_interceptors(provider: TracerProvider | None) -> list[Any]:
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=provider, filter_=_not_health())]


def client_interceptors(provider: TracerProvider | None) -> list[Any]:
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=provider, filter_=_not_health()))


def tracer_of(provider: TracerProvider | None, name: str = "ivl") -> trace.Tracer:
    return provider.get_tracer(name) if provider is not None else trace.NoOpTracer()


def shutdown(provider: TracerProvider | None) -> None:
    if provider is not None:
        provider.shutdown()  # flushes the batch exporter
