"""The gateway process: gRPC (grpc.aio) and HTTP (uvicorn) in one asyncio loop, on the shared lifecycle
(ivl_proto.server_lifecycle: bind, start, health, drain, stop): `_after_start` starts the replica clients and
the HTTP listener; `drain` stops HTTP and gRPC together; `_release` closes the clients and the cache.

Both listeners are public edges (docs/gateway.md "Public deployment checklist"): uvicorn runs with
http_guard's protocol (header/body deadlines, minimum body rate, connection cap, keep-alive limits) and
http_edge's middlewares; the gRPC server has grpc's own receive limit set to max_request_bytes, its
connection options (handshake timeout, idle connections, concurrent streams) and grpc_edge's interceptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass

import uvicorn
from ivl_proto import tracing
from ivl_proto.grpc_runtime import add_health_and_reflection, new_aio_server
from ivl_proto.server_lifecycle import ServerLifecycle, run_until_signal
from opentelemetry.sdk.trace import TracerProvider

from ivl_gateway.chat import ChatService
from ivl_gateway.edge_state import EdgeState
from ivl_gateway.grpc_api import SERVICE_NAME, ChatServicer, add_chat_servicer
from ivl_gateway.grpc_edge import EdgeInterceptor
from ivl_gateway.http_api import build_app
from ivl_gateway.http_guard import ConnectionGuard, GuardLimits
from ivl_gateway.log_throttle import ThrottleFilter
from ivl_gateway.metrics import GatewayMetrics
from ivl_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


@dataclass
class BoundPorts:
    grpc: int
    http: int


class Gateway(ServerLifecycle):
    """Build with `build_gateway(settings)`; `await start()` binds both ports (0 = free ones; `.ports`)."""

    def __init__(self, settings: GatewaySettings, tracer_provider: TracerProvider | None = None) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics(settings.model_name)
        self.tracer_provider = tracer_provider or tracing.tracer_provider("ivl-gateway", settings.otlp_traces_endpoint)
        self.chat_service = ChatService(settings, self.metrics, self.tracer_provider)
        self.edges = EdgeState.build(settings, self.metrics)
        self.app = build_app(settings, self.chat_service, self.edges)
        self.guard = ConnectionGuard(GuardLimits.from_settings(settings), self.metrics.http_connections,
                                     self.metrics.http_connections_closed, self.edges.throttle)
        grpc_server = new_aio_server(
            settings.max_request_bytes,
            max_receive_bytes=settings.max_request_bytes,
            options=grpc_edge_options(settings),
            interceptors=[EdgeInterceptor(self.edges, SERVICE_NAME)],
            maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
        )
        add_chat_servicer(ChatServicer(self.chat_service, self.edges.keys), grpc_server)
        health = add_health_and_reflection(
            grpc_server, [SERVICE_NAME], reflection_enabled=settings.reflection_access != "off")
        super().__init__("gateway", grpc_server, health, [SERVICE_NAME], settings.grpc_host, settings.grpc_port,
                         settings.grace_s)
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self.ports: BoundPorts | None = None

    async def _after_start(self) -> None:
        """The replica clients, then the HTTP listener; health turns SERVING right after (nothing to load)."""
        await self.chat_service.start()
        assert self.port is not None
        grpc_port = self.port
        # proto IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on accepted sockets whose proto
        # says TCP. With proto 0 every kept-alive response of more than one write (head, body, each SSE chunk)
        # waited for the client's delayed ACK: +40 ms per request, measured (docs/gateway.md).
        family = socket.AF_INET6 if ":" in self.settings.http_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.settings.http_host, self.settings.http_port))
        http_port = sock.getsockname()[1]
        self._http = uvicorn.Server(self._uvicorn_config())
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]), name="gateway-http")
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        self.ports = BoundPorts(grpc_port, http_port)
        log.info("gateway serving gRPC on %s:%d and HTTP on %s:%d", self.settings.grpc_host, grpc_port,
                 self.settings.http_host, http_port)

    def _uvicorn_config(self) -> uvicorn.Config:
        """uvicorn's own limits where it has them; the rest is http_guard's protocol (passed as `http`)."""
        s = self.settings
        config = uvicorn.Config(
            self.app,
            http=self.guard.protocol_class(),  # type: ignore[arg-type]
            log_level="warning",
            access_log=False,  # http_edge.AccessLogMiddleware writes one line per request
            log_config=None,  # keep the process's logging setup (python -m ivl_gateway configures it)
            lifespan="off",
            timeout_graceful_shutdown=2,
            timeout_keep_alive=s.http_keepalive_timeout_s,  # type: ignore[arg-type]
            h11_max_incomplete_event_size=s.http_max_header_bytes,
            backlog=2048,  # uvicorn's default; the kernel caps it at net.core.somaxconn
            proxy_headers=bool(s.trusted_proxies),
            forwarded_allow_ips=",".join(s.trusted_proxies) or None,
            server_header=False,
        )
        uvicorn_errors = logging.getLogger("uvicorn.error")  # "Invalid HTTP request received." per bad client
        if not any(isinstance(f, ThrottleFilter) for f in uvicorn_errors.filters):
            uvicorn_errors.addFilter(ThrottleFilter(self.edges.throttle))
        return config

    async def drain(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, then HTTP (uvicorn's own graceful shutdown) and gRPC drain side by side."""
        grace = self.grace_s if grace_s is None else grace_s
        await asyncio.gather(self._drain_http(grace), super().drain(grace))

    async def _drain_http(self, grace_s: float) -> None:
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._http_task, timeout=grace_s + 3)

    async def _release(self) -> None:
        await self.chat_service.close()
        tracing.shutdown(self.tracer_provider)


def grpc_edge_options(settings: GatewaySettings) -> list[tuple[str, int]]:
    """grpc core's own connection limits for the public port."""
    return [
        ("grpc.server_handshake_timeout_ms", int(settings.http_header_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", int(settings.grpc_max_connection_idle_s * 1000)),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        ("grpc.http2.max_pings_without_data", 2),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.max_metadata_size", settings.http_max_header_bytes),
    ]


def build_gateway(settings: GatewaySettings, tracer_provider: TracerProvider | None = None) -> Gateway:
    return Gateway(settings, tracer_provider)


async def serve(settings: GatewaySettings) -> None:
    """Run until SIGTERM/SIGINT."""
    await run_until_signal(build_gateway(settings))
