"""Lifecycle of the LLM gRPC server: build (bind) apart from serve; health NOT_SERVING until the model is
loaded and warmed; reflection; raised message size limits; graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health
from ivl_proto import tracing
from ivl_proto.grpc_runtime import (
    add_health_and_reflection,
    bind,
    graceful_stop,
    new_aio_server,
    set_serving,
    wait_for_stop_signal,
)
from ivl_proto.internal_auth import token_server_interceptors
from ivl_proto.llm.v1 import llm_pb2
from ivl_proto.metrics_runtime import MetricsServer
from ivl_proto.request_context import RequestIdServerInterceptor
from opentelemetry.sdk.trace import TracerProvider

from ivl_llm.service import LLMService
from ivl_llm.servicer import LanguageModelServicer, add_llm_servicer
from ivl_llm.settings import LLMSettings

log = logging.getLogger(__name__)

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LanguageModel"].full_name


@dataclass
class LLMServer:
    server: grpc.aio.Server
    port: int
    host: str
    health: health.aio.HealthServicer
    service: LLMService
    settings: LLMSettings
    loading: asyncio.Task[None] | None = None
    metrics_server: MetricsServer | None = None
    tracer_provider: TracerProvider | None = None

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "[::]") else self.host
        return f"{host}:{self.port}"

    async def start(self, wait: bool = True) -> None:
        """Start answering at once (health NOT_SERVING) and load + warm the model; health turns SERVING
        when that is done. wait=True returns then; wait=False returns at once (see wait_ready)."""
        await self.server.start()
        if self.settings.metrics_port and self.metrics_server is None:
            self.metrics_server = MetricsServer.start(
                self.service.metrics.exposed, self.settings.metrics_host or self.host, self.settings.metrics_port)
            log.info("LLM metrics on port %d", self.metrics_server.port)
        await set_serving(self.health, [SERVICE_NAME], False)
        self.loading = asyncio.create_task(self._load())
        if wait:
            await self.wait_ready()

    async def _load(self) -> None:
        await self.service.start()
        await set_serving(self.health, [SERVICE_NAME], True)
        log.info("LLM service serving %s on %s", self.service.checkpoint.model_id, self.address)

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Return once the model is loaded and warmed; raises what loading raised."""
        if self.loading is None:
            raise RuntimeError("start() the server first")
        await asyncio.wait_for(asyncio.shield(self.loading), timeout_s)

    async def stop(self, grace_s: float) -> None:
        if self.loading is not None and not self.loading.done():
            self.loading.cancel()
        await graceful_stop(self.server, self.health, grace_s, on_stopped=self.service.close)
        tracing.shutdown(self.tracer_provider)
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None


def build_server(
    settings: LLMSettings, service: LLMService | None = None, tracer_provider: TracerProvider | None = None
) -> LLMServer:
    """Create the server and bind it (port 0 picks a free port); nothing is loaded yet. Tracing: the given
    provider, else OTLP to settings.otlp_traces_endpoint, else off."""
    service = service or LLMService(settings)
    provider = tracer_provider or tracing.tracer_provider("ivl-llm", settings.otlp_traces_endpoint)
    service.tracer = tracing.tracer_of(provider, "ivl_llm")
    server = new_aio_server(settings.max_message_bytes, interceptors=[
        *tracing.server_interceptors(provider), *token_server_interceptors(settings.auth_token, "LLM"),
        RequestIdServerInterceptor()])
    add_llm_servicer(LanguageModelServicer(service), server)
    health_servicer = add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, settings.host, settings.port)
    return LLMServer(server, port, settings.host, health_servicer, service, settings, tracer_provider=provider)


async def serve(settings: LLMSettings) -> None:
    llm_server = build_server(settings)
    await llm_server.start()
    await wait_for_stop_signal()
    log.info("stopping: letting in-flight generations finish for %.1f s", settings.grace_s)
    await llm_server.stop(settings.grace_s)
