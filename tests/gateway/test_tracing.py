"""One chat turn, followed across the three real services: OpenTelemetry spans from the gateway, the vision service
and the LLM service in ONE trace (context carried in gRPC metadata by opentelemetry-instrumentation-grpc), collected
in-process with an InMemorySpanExporter; and the request id on the log lines of every service."""

from __future__ import annotations

import logging

import openai
import pytest
from gateway_helpers import GATEWAY_OVERRIDES, LLM_OVERRIDES, data_url, new_png
from ivl_proto.request_context import RequestIdFilter
from ivl_proto.tracing import tracer_provider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.stack import running_stack


@pytest.fixture(scope="module")
def traced(tiny_original):
    exporter = InMemorySpanExporter()
    providers = {name: tracer_provider(f"ivl-{name}", exporter=exporter) for name in ("gateway", "vision", "llm")}
    with running_stack(tiny_original, gateway=GATEWAY_OVERRIDES, llm=LLM_OVERRIDES, tracer_providers=providers) as stack:
        yield stack, exporter


def service_of(span) -> str:
    return span.resource.attributes["service.name"]


def test_one_trace_spans_gateway_vision_and_llm(traced):
    stack, exporter = traced
    exporter.clear()
    client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.with_raw_response.create(
        model="ivl", max_tokens=4, temperature=0, extra_headers={"X-Request-Id": "trace-test-1"},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(new_png())}},
                                               {"type": "text", "text": "What is it?"}]}])
    assert reply.headers["x-request-id"] == "trace-test-1"
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == "ivl.gateway.chat"]
    trace_spans = [s for s in spans if s.context.trace_id == root.context.trace_id]
    assert {service_of(s) for s in trace_spans} == {"ivl-gateway", "ivl-vision", "ivl-llm"}
    names = {(service_of(s), s.name) for s in trace_spans}
    for expected in [("ivl-gateway", "ivl.gateway.chat"), ("ivl-gateway", "ivl.gateway.embeddings"),
                     ("ivl-gateway", "/ivl.vision.v1.VisionEncoder/EncodeImages"),
                     ("ivl-vision", "/ivl.vision.v1.VisionEncoder/EncodeImages"), ("ivl-vision", "ivl.vision.decode"),
                     ("ivl-vision", "ivl.vision.encode"), ("ivl-gateway", "/ivl.llm.v1.LanguageModel/Generate"),
                     ("ivl-llm", "/ivl.llm.v1.LanguageModel/Generate"), ("ivl-llm", "ivl.llm.queue"),
                     ("ivl-llm", "ivl.llm.generate")]:
        assert expected in names, f"{expected} not in the trace: {sorted(names)}"
    by_id = {s.context.span_id: s for s in trace_spans}
    for span in trace_spans:  # every span hangs off the turn's root: one tree, nothing detached
        node = span
        while node.parent is not None:
            node = by_id[node.parent.span_id]
        assert node is root
    server_generate = next(s for s in trace_spans if service_of(s) == "ivl-llm" and s.name.endswith("/Generate"))
    client_generate = by_id[server_generate.parent.span_id]
    assert service_of(client_generate) == "ivl-gateway"  # the LLM's server span is the child of the gateway's call
    generate = next(s for s in trace_spans if s.name == "ivl.llm.generate")
    assert generate.attributes["ivl.completion_tokens"] >= 1 and root.attributes["ivl.outcome"] == "ok"
    assert not [s for s in spans if "Health" in s.name]  # health checks are not traced
    print_trace(root, trace_spans)


def print_trace(root, spans) -> None:
    children: dict[int, list] = {}
    for span in spans:
        if span.parent is not None:
            children.setdefault(span.parent.span_id, []).append(span)

    def show(span, depth: int) -> None:
        print(f"{'  ' * depth}{service_of(span)}: {span.name} ({(span.end_time - span.start_time) / 1e6:.1f} ms)")
        for child in sorted(children.get(span.context.span_id, []), key=lambda s: s.start_time):
            show(child, depth + 1)

    show(root, 0)


def test_every_service_logs_the_request_id(traced, caplog):
    stack, _ = traced
    for handler_logger in ("ivl_vision", "ivl_llm", "ivl_gateway"):
        logging.getLogger(handler_logger).setLevel(logging.DEBUG)
    caplog.handler.addFilter(RequestIdFilter())
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            RequestIdFilter().filter(record)
            records.append(record)

    keep = Keep(level=logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(keep)
    try:
        client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused", max_retries=0)
        client.chat.completions.create(
            model="ivl", max_tokens=2, user="log-test-user", extra_headers={"X-Request-Id": "req-logs-42"},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(new_png())}},
                                                   {"type": "text", "text": "hi"}]}])
    finally:
        root.removeHandler(keep)
    tagged = {r.name.split(".")[0] for r in records if getattr(r, "request_id", "") == "req-logs-42"}
    assert {"ivl_gateway", "ivl_vision", "ivl_llm"} <= tagged, sorted((r.name, r.request_id) for r in records)
