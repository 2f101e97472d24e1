"""The launcher's own Prometheus metrics, served on a small /metrics endpoint of its own (loopback).

ivl_stack_child_up{service}        1 while the child runs and answers its readiness probe
ivl_stack_restarts_total{service}  restarts after the child died
ivl_stack_child_given_up{service}  1 once the child crash-looped and is no longer restarted
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_wsgi_server


class StackMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.up = Gauge("ivl_stack_child_up", "1 while the child runs and is ready", ["service"], registry=self.registry)
        self.restarts = Counter(
            "ivl_stack_restarts_total", "restarts of a child after it died", ["service"], registry=self.registry
        )
        self.given_up = Gauge(
            "ivl_stack_child_given_up", "1 once the child crash-looped and is not restarted any more", ["service"],
            registry=self.registry,
        )
        self._server: WSGIServer | None = None

    def add(self, service: str) -> None:
        """Every series exists from the start (0), so a dashboard sees the service before it fails."""
        self.up.labels(service).set(0)
        self.restarts.labels(service)
        self.given_up.labels(service).set(0)

    def serve(self, host: str, port: int) -> None:
        self._server, _ = start_wsgi_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
