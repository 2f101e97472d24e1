"""The gateway process: gRPC (grpc.aio) and HTTP (uvicorn) in one asyncio loop, with a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass

import uvicorn
from ivl_proto.grpc_runtime import (
    add_health_and_reflection,
    bind,
    graceful_stop,
    new_aio_server,
    set_serving,
    wait_for_stop_signal,
)

from ivl_gateway.auth import ApiKeys
from ivl_gateway.chat import ChatService
from ivl_gateway.grpc_api import SERVICE_NAME, ChatServicer, add_chat_servicer
from ivl_gateway.http_api import build_app
from ivl_gateway.metrics import GatewayMetrics
from ivl_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


@dataclass
class BoundPorts:
    grpc: int
    http: int


class Gateway:
    """Build with `build_gateway(settings)`; `await start()` binds both ports (0 = free ones)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.chat_service = ChatService(settings, self.metrics)
        self.app = build_app(settings, self.chat_service)
        self._grpc = new_aio_server(settings.max_message_bytes)
        add_chat_servicer(ChatServicer(self.chat_service, ApiKeys(settings.api_keys)), self._grpc)
        self._health = add_health_and_reflection(self._grpc, [SERVICE_NAME])
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self.ports: BoundPorts | None = None

    async def start(self) -> BoundPorts:
        await self.chat_service.start()
        grpc_port = bind(self._grpc, self.settings.grpc_host, self.settings.grpc_port)
        await self._grpc.start()
        await set_serving(self._health, [SERVICE_NAME], True)
        sock = socket.socket(socket.AF_INET6 if ":" in self.settings.http_host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.settings.http_host, self.settings.http_port))
        http_port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2)
        self._http = uvicorn.Server(config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]), name="gateway-http")
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        self.ports = BoundPorts(grpc_port, http_port)
        log.info("gateway serving gRPC on %s:%d and HTTP on %s:%d", self.settings.grpc_host, grpc_port,
                 self.settings.http_host, http_port)
        return self.ports

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.settings.grace_s if grace_s is None else grace_s
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._http_task, timeout=grace + 3)
        await graceful_stop(self._grpc, self._health, grace, self.chat_service.close)


def build_gateway(settings: GatewaySettings) -> Gateway:
    return Gateway(settings)


async def serve(settings: GatewaySettings) -> None:
    gateway = build_gateway(settings)
    await gateway.start()
    try:
        await wait_for_stop_signal()
    finally:
        await gateway.stop()
