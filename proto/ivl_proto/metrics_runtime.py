"""What every service's Prometheus metrics share: a registry of the service's own, every series labelled
`model_name`, no `_created` series, and (vision and LLM) a small HTTP server of their own on `metrics_port`.

    registry = CollectorRegistry(auto_describe=True)          # the service's metrics register here
    exposed = ModelNameRegistry(registry, lambda: model_id)   # what /metrics renders
    server = MetricsServer.start(exposed, host, port)          # port 0: a free one; server.port
    server.stop()

The model name is added when a scrape collects (the service may learn it after its metrics are made: the
gateway from the LLM's Info), so the call sites never pass it. prometheus_client's `_created` samples (one
more series per counter and histogram, which vLLM also switches off) are disabled process-wide once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

MODEL_LABEL = "model_name"
CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)
TOKEN_COUNT_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def new_registry() -> CollectorRegistry:
    """A registry of one service (never the process-global default one), with `_created` series off."""
    prometheus_client.disable_created_metrics()
    return CollectorRegistry(auto_describe=True)


class ModelNameRegistry(Collector):
    """Collects `inner` and adds model_name=<model_name()> to every sample (a sample that has it keeps it)."""

    def __init__(self, inner: CollectorRegistry, model_name: Callable[[], str]) -> None:
        self.inner = inner
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        name = self._model_name() or "unknown"
        for family in self.inner.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labels = {MODEL_LABEL: name, **sample.labels}
                labelled.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
            yield labelled

    def render(self) -> bytes:
        return generate_latest(self)  # type: ignore[arg-type]


@dataclass
class MetricsServer:
    """prometheus_client's own HTTP server (a daemon thread) serving one registry at any path."""

    port: int
    _server: object
    _thread: threading.Thread

    @classmethod
    def start(cls, registry: Collector, host: str, port: int) -> MetricsServer:
        server, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
        return cls(int(server.server_port), server, thread)

    def stop(self) -> None:
        self._server.shutdown()  # type: ignore[attr-defined]
        self._server.server_close()  # type: ignore[attr-defined]
        self._thread.join(5)
