"""Client of the vision encoder replicas (ivl.vision.v1): Info, PlanImages, EncodeImages."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from ivl_proto import tensor_wire
from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.image_budget import ImageBudget
from ivl_proto.vision.v1 import vision_pb2, vision_pb2_grpc

from ivl_gateway.embedding_codec import ImageEmbedding, TilingChoice
from ivl_gateway.metrics import GatewayMetrics
from ivl_gateway.service_client import ServiceClient
from ivl_gateway.settings import GatewaySettings

GRPC_SERVICE = vision_pb2.DESCRIPTOR.services_by_name["VisionEncoder"].full_name


def vision_identity(info: vision_pb2.InfoResponse) -> tuple[tuple[str, object], ...]:
    """What must be equal on every vision replica: the fingerprint (weights, configs, dtype)."""
    return (("fingerprint", info.fingerprint),)


@dataclass(frozen=True)
class EncodeResult:
    embeddings: list[ImageEmbedding]
    fingerprint: str
    seconds: float


@dataclass(frozen=True)
class EncodeReply:
    """An EncodeImagesResponse whose embeddings' data stayed in the received bytes (views, no copy)."""

    response: vision_pb2.EncodeImagesResponse  # embeddings with empty data
    embedding_data: list[memoryview]


def parse_encode_reply(raw: bytes) -> EncodeReply:
    response, datas = tensor_wire.split_tensors(vision_pb2.EncodeImagesResponse, raw, (1, 1))
    return EncodeReply(response, datas)


def vision_stub(channel: grpc.aio.Channel) -> vision_pb2_grpc.VisionEncoderStub:
    """The generated stub, with EncodeImages reading its embeddings as views of the received bytes."""
    stub = vision_pb2_grpc.VisionEncoderStub(channel)
    stub.EncodeImages = channel.unary_unary(  # type: ignore[method-assign]
        f"/{GRPC_SERVICE}/EncodeImages", request_serializer=vision_pb2.EncodeImagesRequest.SerializeToString,
        response_deserializer=parse_encode_reply,
    )
    return stub


class VisionClient(ServiceClient[vision_pb2.InfoResponse]):
    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics,
                 interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> None:
        super().__init__("vision", settings.vision_addresses, vision_stub, GRPC_SERVICE,
                         vision_pb2.InfoRequest(), vision_identity, settings, settings.vision_timeout_s, interceptors)
        self._metrics = metrics

    async def plan(self, images: list[tuple[bytes, TilingChoice]]) -> list[common_pb2.ImagePlan]:
        request = vision_pb2.PlanImagesRequest(
            images=[vision_pb2.ImageInput(data=data, tiling=t.to_pb()) for data, t in images]
        )
        response = await self.unary("PlanImages", request, self._settings.info_timeout_s * 4)
        return list(response.plans)

    async def encode(self, images: list[tuple[bytes, TilingChoice]], budget: ImageBudget | None = None) -> EncodeResult:
        """All of a request's misses in one EncodeImages call, with the request's remaining budget (the
        vision service refuses from the headers, before decoding, what does not fit)."""
        request = vision_pb2.EncodeImagesRequest(
            images=[vision_pb2.ImageInput(data=data, tiling=t.to_pb()) for data, t in images],
            budget=(budget or ImageBudget()).to_pb(),
        )
        start = time.perf_counter()
        reply: EncodeReply = await self.unary("EncodeImages", request, self._settings.vision_timeout_s)
        seconds = time.perf_counter() - start
        response = reply.response
        if len(response.images) != len(images):
            raise ServingError(
                ErrorCode.INTERNAL,
                f"the vision service returned {len(response.images)} embeddings for {len(images)} images",
            )
        self._metrics.encode_latency.observe(seconds)
        self._metrics.encoded_images.inc(len(images))
        embeddings = [
            ImageEmbedding(
                dtype=item.embedding.dtype,
                shape=tuple(int(d) for d in item.embedding.shape),
                data=data,
                plan=item.plan,
            )
            for item, data in zip(response.images, reply.embedding_data, strict=True)
        ]
        return EncodeResult(embeddings, response.fingerprint, seconds)
