"""The gRPC API (ivl.gateway.v1.Chat): proto <-> ChatTurn, auth, request size; the work is in chat.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from ivl_proto.errors import ErrorCode, ServingError, invalid
from ivl_proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ivl_proto.grpc_runtime import map_errors
from ivl_proto.request_context import REQUEST_ID, REQUEST_ID_METADATA_KEY

from ivl_gateway.auth import ApiKeys
from ivl_gateway.chat import ChatService
from ivl_gateway.conversation import ChatMessage, ChatTurn, ImagePart, budget, resolve_tiling
from ivl_gateway.embedding_codec import TilingChoice

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Chat"].full_name


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes did not parse (e.g. a string field with invalid UTF-8)."""

    type_name: str
    reason: str


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer that hands parse failures to the method (-> INVALID_ARGUMENT) instead of
    letting gRPC answer UNKNOWN."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as error:
            return Undecodable(message_type.DESCRIPTOR.full_name, str(error))

    return parse


def _require_decoded(request: object) -> None:
    if isinstance(request, Undecodable):
        raise invalid(
            f"the request is not a valid {request.type_name} ({request.reason}); strings must be valid UTF-8"
        )


def add_chat_servicer(servicer: ChatServicer, server: grpc.aio.Server) -> None:
    """Register ivl.gateway.v1.Chat like the generated add_ChatServicer_to_server, with lenient parsing."""
    handlers = {
        "Chat": grpc.unary_stream_rpc_method_handler(
            servicer.Chat, request_deserializer=_lenient(gateway_pb2.ChatRequest),
            response_serializer=gateway_pb2.ChatResponse.SerializeToString,
        ),
        "PlanImages": grpc.unary_unary_rpc_method_handler(
            servicer.PlanImages, request_deserializer=_lenient(gateway_pb2.PlanImagesRequest),
            response_serializer=gateway_pb2.PlanImagesResponse.SerializeToString,
        ),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, request_deserializer=_lenient(gateway_pb2.InfoRequest),
            response_serializer=gateway_pb2.InfoResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def turn_from_pb(request: gateway_pb2.ChatRequest) -> ChatTurn:
    messages: list[ChatMessage] = []
    for message in request.messages:
        parts: list[str | bytes | ImagePart] = []
        for part in message.content:
            kind = part.WhichOneof("part")
            if kind == "text":
                parts.append(part.text)
            elif kind == "image":
                own = part.image.tiling if part.image.HasField("tiling") else None
                parts.append(ImagePart(bytes(part.image.data), own))
        messages.append(ChatMessage(role=message.role, parts=parts))
    return ChatTurn(messages=messages, sampling=request.sampling, tiling=request.tiling, request_id=request.request_id)


class ChatServicer(gateway_pb2_grpc.ChatServicer):
    def __init__(self, service: ChatService, keys: ApiKeys) -> None:
        self._service = service
        self._keys = keys
        self._max_bytes = service.settings.max_request_bytes

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self._keys.enabled:
            return
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
        key = ApiKeys.from_authorization(metadata.get("authorization")) or metadata.get("x-api-key")
        self._keys.check(key if isinstance(key, str) else None)

    def _check_size(self, request: gateway_pb2.ChatRequest | gateway_pb2.PlanImagesRequest) -> None:
        size = request.ByteSize()
        if size > self._max_bytes:
            raise ServingError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"the request is {size / 2**20:.1f} MiB; the limit is {self._max_bytes / 2**20:.1f} MiB",
            )

    @map_errors
    async def Chat(
        self, request: gateway_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.ChatResponse]:
        _require_decoded(request)
        self._authorize(context)
        self._check_size(request)
        turn = turn_from_pb(request)
        offered = {k.lower(): v for k, v in (context.invocation_metadata() or ())}.get(REQUEST_ID_METADATA_KEY)
        turn.request_id = turn.request_id or (offered if isinstance(offered, str) and offered else "") or \
            f"chat-{uuid.uuid4().hex[:24]}"
        REQUEST_ID.set(turn.request_id)  # this call's task: its log lines and downstream metadata carry it
        stream = self._service.chat(turn, api="grpc")
        try:
            async for event in stream:
                yield event
        finally:
            await stream.aclose()

    @map_errors
    async def PlanImages(
        self, request: gateway_pb2.PlanImagesRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.PlanImagesResponse:
        _require_decoded(request)
        self._authorize(context)
        self._check_size(request)
        if not request.images:
            raise invalid("images is empty: send at least one image")
        if len(request.images) > self._service.settings.max_images_per_request:
            raise invalid(
                f"the request has {len(request.images)} images; the limit is "
                f"{self._service.settings.max_images_per_request} images per request"
            )
        defaults, limit = await self._service.default_tiling()
        # The images are planned as ONE chat message would use them: they share max_tiles (the same
        # budget rule as conversation.tiling_per_image), so a preview shows the tiles really used.
        tiling = budget(resolve_tiling(request.tiling, defaults, limit), len(request.images))
        plans = await self._service.vision.plan([(bytes(i.data), tiling) for i in request.images])
        info = await self._service.vision.info()
        return gateway_pb2.PlanImagesResponse(plans=plans, tokens_per_tile=info.tokens_per_tile)

    @map_errors
    async def Info(
        self, request: gateway_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.InfoResponse:
        _require_decoded(request)
        self._authorize(context)
        return await gateway_info(self._service)


async def gateway_info(service: ChatService) -> gateway_pb2.InfoResponse:
    llm = await service.llm.info()
    vision = await service.vision.info()
    defaults, limit = await service.default_tiling()
    return gateway_pb2.InfoResponse(
        model_id=service.settings.model_name or llm.model_id,
        vision_model_id=vision.model_id,
        vision_fingerprint=vision.fingerprint,
        template=llm.template,
        context_length=llm.context_length,
        hidden_size=llm.hidden_size,
        default_tiling=TilingChoice.to_pb(defaults),
        max_tiles_limit=limit,
        tiny_random_model=(
            service.settings.tiny_random_model
            if service.settings.tiny_random_model is not None
            else llm.random_weights
        ),
        demo_model=llm.demo_model,
    )
