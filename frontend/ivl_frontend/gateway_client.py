"""GatewayClient: the UI's only link to the stack, the gateway's gRPC Chat API (ivl.gateway.v1)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from ivl_proto.errors import ServingError, from_grpc_error
from ivl_proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ivl_proto.grpc_runtime import message_size_options

from ivl_frontend.settings import FrontendSettings


class GatewayClient:
    """A grpc.aio client of ivl.gateway.v1.Chat. The channel is opened lazily in the running event
    loop (Gradio serves from its own loop) and reopened if the loop changes."""

    def __init__(self, settings: FrontendSettings) -> None:
        self._settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._stub: gateway_pb2_grpc.ChatStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> str:
        return self._settings.gateway_address

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        key = self._settings.gateway_api_key
        return (("authorization", f"Bearer {key}"),) if key else ()

    def _chat_stub(self) -> gateway_pb2_grpc.ChatStub:
        loop = asyncio.get_running_loop()
        if self._stub is None or self._loop is not loop:
            # A gateway that restarts is dialled again within 2 s (gRPC's own backoff grows to 120 s).
            options = [*message_size_options(), ("grpc.initial_reconnect_backoff_ms", 500),
                       ("grpc.max_reconnect_backoff_ms", 2000)]
            self._channel = grpc.aio.insecure_channel(self.address, options=options)
            self._stub = gateway_pb2_grpc.ChatStub(self._channel)
            self._loop = loop
        return self._stub

    async def info(self) -> gateway_pb2.InfoResponse:
        try:
            return await self._chat_stub().Info(
                gateway_pb2.InfoRequest(), timeout=self._settings.info_timeout_s, metadata=self._metadata()
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error, f"gateway at {self.address}") from None

    async def plan_images(self, request: gateway_pb2.PlanImagesRequest) -> gateway_pb2.PlanImagesResponse:
        try:
            return await self._chat_stub().PlanImages(
                request, timeout=self._settings.info_timeout_s * 4, metadata=self._metadata()
            )
        except grpc.RpcError as error:
            raise from_grpc_error(error, f"gateway at {self.address}") from None

    async def chat(self, request: gateway_pb2.ChatRequest) -> AsyncIterator[gateway_pb2.ChatResponse]:
        """Stream one chat turn. Closing the iterator early (Stop, a closed tab) cancels the gRPC call,
        which the gateway passes on to the LLM service so generation really stops."""
        call = self._chat_stub().Chat(
            request, timeout=self._settings.gateway_timeout_s, metadata=self._metadata()
        )
        try:
            async for response in call:
                yield response
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and call.cancelled():
                return
            raise from_grpc_error(error, f"gateway at {self.address}") from None
        finally:
            if not call.done():
                call.cancel()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._stub = None
        self._loop = None


__all__ = ["GatewayClient", "ServingError"]
