"""The LLM gRPC server on the shared lifecycle (ivl_proto.server_lifecycle: bind, start, health, drain, stop):
health NOT_SERVING until the model is loaded and warmed (`_load`), reflection, raised message size limits;
`_release` closes the backend after the drain; graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import logging

from ivl_proto import tracing
from ivl_proto.grpc_runtime import add_health_and_reflection, new_aio_server
from ivl_proto.internal_auth import token_server_interceptors
from ivl_proto.llm.v1 import llm_pb2
from ivl_proto.metrics_runtime import MetricsServer
from ivl_proto.request_context import RequestIdServerInterceptor
from ivl_proto.server_lifecycle import ServerLifecycle, run_until_signal
from opentelemetry.sdk.trace import TracerProvider

from ivl_llm.service import LLMService
from ivl_llm.servicer import LanguageModelServicer, add_llm_servicer
from ivl_llm.settings import LLMSettings

log = logging.getLogger(__name__)

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LanguageModel"].full_name


class LLMServer(ServerLifecycle):
    """One gRPC server with its LLMService; start() answers at once, the model loads behind it."""

    def __init__(self, settings: LLMSettings, service: LLMService, tracer_provider: TracerProvider) -> None:
        self.settings = settings
        self.service = service
        self.tracer_provider = tracer_provider
        service.tracer = tracing.tracer_of(tracer_provider, "ivl_llm")
        server = new_aio_server(settings.max_message_bytes, interceptors=[
            *tracing.server_interceptors(tracer_provider), *token_server_interceptors(settings.auth_token, "LLM"),
            RequestIdServerInterceptor()])
        add_llm_servicer(LanguageModelServicer(service), server)
        health = add_health_and_reflection(server, [SERVICE_NAME])
        super().__init__("LLM", server, health, [SERVICE_NAME], settings.host, settings.port, settings.grace_s)
        self.metrics_server: MetricsServer | None = None

    async def _after_start(self) -> None:
        if self.settings.metrics_port and self.metrics_server is None:
            self.metrics_server = MetricsServer.start(
                self.service.metrics.exposed, self.settings.metrics_host or self.host, self.settings.metrics_port)
            log.info("LLM metrics on port %d", self.metrics_server.port)

    async def _load(self) -> None:
        await self.service.start()
        log.info("LLM service serving %s on %s", self.service.checkpoint.model_id, self.address)

    async def _release(self) -> None:
        await self.service.close()
        tracing.shutdown(self.tracer_provider)
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None


def build_server(
    settings: LLMSettings, service: LLMService | None = None, tracer_provider: TracerProvider | None = None
) -> LLMServer:
    """Create the server (nothing bound or loaded yet). Tracing: the given provider, else OTLP to
    settings.otlp_traces_endpoint, else off."""
    provider = tracer_provider or tracing.tracer_provider("ivl-llm", settings.otlp_traces_endpoint)
    return LLMServer(settings, service or LLMService(settings), provider)


async def serve(settings: LLMSettings) -> None:
    """Run until SIGTERM/SIGINT; raise if the model cannot be loaded."""
    await run_until_signal(build_server(settings))
