"""gRPC servicer of ivl.vision.v1.VisionEncoder: proto <-> domain conversions only.

The servicer is registered before the model is loaded (so health can be polled while loading);
calls that arrive before `attach(service)` get UNAVAILABLE.
"""

from __future__ import annotations

import logging
import time

import grpc
from ivl_proto import tensor_wire
from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.grpc_runtime import map_errors, register_service
from ivl_proto.image_budget import ImageBudget
from ivl_proto.tensor_codec import tensor_to_wire
from ivl_proto.vision.v1 import vision_pb2, vision_pb2_grpc

from ivl_vision.metrics import VisionMetrics
from ivl_vision.service import (
    BatchingInfo,
    DecodeInfo,
    EncodeResult,
    ImageRequest,
    PlannedImage,
    TilingRequest,
    VisionService,
)
from ivl_vision.tiling import TilingConfig

log = logging.getLogger(__name__)
SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionEncoder"].full_name


def tiling_from_pb(options: common_pb2.TilingOptions) -> TilingRequest:
    return TilingRequest(
        max_tiles=options.max_tiles if options.HasField("max_tiles") else None,
        min_tiles=options.min_tiles if options.HasField("min_tiles") else None,
        use_thumbnail=options.use_thumbnail if options.HasField("use_thumbnail") else None,
    )


def tiling_to_pb(config: TilingConfig) -> common_pb2.TilingOptions:
    return common_pb2.TilingOptions(
        max_tiles=config.max_tiles, min_tiles=config.min_tiles, use_thumbnail=config.use_thumbnail
    )


def images_from_pb(images: list[vision_pb2.ImageInput]) -> list[ImageRequest]:
    return [ImageRequest(image.data, tiling_from_pb(image.tiling)) for image in images]


def plan_to_pb(planned: PlannedImage) -> common_pb2.ImagePlan:
    plan, tiling = planned.plan, planned.tiling
    return common_pb2.ImagePlan(
        grid_cols=plan.grid_cols, grid_rows=plan.grid_rows, num_tiles=plan.num_tiles,
        resize_width=plan.resize_width, resize_height=plan.resize_height,
        original_width=plan.original_width, original_height=plan.original_height,
        has_thumbnail=plan.has_thumbnail, num_tokens=planned.num_tokens,
        max_tiles=tiling.max_tiles, min_tiles=tiling.min_tiles, use_thumbnail=tiling.use_thumbnail,
    )


def batching_to_pb(info: BatchingInfo) -> vision_pb2.BatchingStats:
    stats = info.stats
    return vision_pb2.BatchingStats(
        enabled=info.enabled, max_batch_tiles=info.max_batch_tiles, max_wait_ms=info.max_wait_ms,
        max_queued_tiles=info.max_queued_tiles, forwards=stats.forwards, tiles_encoded=stats.tiles_encoded,
        max_batch_seen=stats.max_batch_seen, requests=stats.requests, rejected_requests=stats.rejected_requests,
        failed_forwards=stats.failed_forwards, queued_tiles=info.queued_tiles,
    )


def decode_to_pb(info: DecodeInfo) -> vision_pb2.DecodeStats:
    pool, budget = info.pool, info.budget
    return vision_pb2.DecodeStats(
        workers=info.workers, busy_workers=info.busy_workers, tasks=pool.tasks, cpu_limit_kills=pool.cpu_kills,
        wall_limit_kills=pool.wall_kills, cancel_kills=pool.cancel_kills, crashes=pool.crashes,
        recycles=pool.recycles, pixels_in_flight=info.pixels_in_flight,
        max_pixels_in_flight=info.max_pixels_in_flight, budget_waits=budget.waits, budget_timeouts=budget.timeouts,
    )


def encode_response_bytes(result: EncodeResult) -> bytes:
    """EncodeImagesResponse bytes: protobuf writes the small fields, each embedding's array goes in as it is."""
    pieces: list[tensor_wire.Buffer] = [vision_pb2.EncodeImagesResponse(
        preprocess_s=result.preprocess_s, encode_s=result.encode_s, fingerprint=result.fingerprint).SerializeToString()]
    for image in result.images:
        encoded = tensor_wire.submessage(1, tensor_to_wire(image.embedding, image.dtype).pieces())
        encoded += tensor_wire.submessage(2, [plan_to_pb(image.planned).SerializeToString()])
        pieces += tensor_wire.submessage(1, encoded)
    return tensor_wire.join(pieces)


def _serialize(response: object) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()  # type: ignore[attr-defined]


def add_vision_servicer(servicer: VisionEncoderServicer, server: grpc.aio.Server) -> None:
    """Register ivl.vision.v1.VisionEncoder like the generated add_VisionEncoderServicer_to_server, except that
    EncodeImages returns its response already serialized."""
    handlers = {
        "EncodeImages": grpc.unary_unary_rpc_method_handler(
            servicer.EncodeImages, request_deserializer=vision_pb2.EncodeImagesRequest.FromString,
            response_serializer=_serialize,
        ),
        "PlanImages": grpc.unary_unary_rpc_method_handler(
            servicer.PlanImages, request_deserializer=vision_pb2.PlanImagesRequest.FromString,
            response_serializer=vision_pb2.PlanImagesResponse.SerializeToString,
        ),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, request_deserializer=vision_pb2.InfoRequest.FromString,
            response_serializer=vision_pb2.InfoResponse.SerializeToString,
        ),
    }
    register_service(server, SERVICE_NAME, handlers)


class VisionEncoderServicer(vision_pb2_grpc.VisionEncoderServicer):
    def __init__(self, service: VisionService | None = None, metrics: VisionMetrics | None = None) -> None:
        self._service = service
        self.metrics = metrics or VisionMetrics()

    def attach(self, service: VisionService) -> None:
        self._service = service
        self.metrics.attach(service)

    def _require(self) -> VisionService:
        if self._service is None:
            raise ServingError(
                ErrorCode.UNAVAILABLE,
                "the vision encoder is still loading its model; poll grpc.health.v1 until SERVING",
            )
        return self._service

    @map_errors
    async def EncodeImages(self, request: vision_pb2.EncodeImagesRequest, context: grpc.aio.ServicerContext) -> bytes:
        """The EncodeImagesResponse, serialized here with one copy of each embedding (ivl_proto.tensor_wire)."""
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            result = await self._require().encode_images(
                images_from_pb(request.images), tiling_from_pb(request.tiling), ImageBudget.from_pb(request.budget)
            )
            outcome = "ok"
        except ServingError as error:
            outcome = error.code.value
            raise
        finally:
            self.metrics.requests.labels(outcome=outcome).inc()
        metrics = self.metrics
        metrics.request_seconds.observe(time.perf_counter() - started)
        metrics.preprocess_seconds.observe(result.preprocess_s)
        metrics.request_images.observe(len(result.images))
        tiles = sum(image.planned.plan.num_tiles for image in result.images)
        metrics.request_tiles.observe(tiles)
        log.debug("EncodeImages: %d image(s), %d tiles, decode %.3f s, encode %.3f s", len(result.images), tiles,
                  result.preprocess_s, result.encode_s)
        return encode_response_bytes(result)

    @map_errors
    async def PlanImages(
        self, request: vision_pb2.PlanImagesRequest, context: grpc.aio.ServicerContext
    ) -> vision_pb2.PlanImagesResponse:
        sizes = [(size.width, size.height) for size in request.sizes]
        planned = await self._require().plan_images(images_from_pb(request.images), sizes, tiling_from_pb(request.tiling))
        return vision_pb2.PlanImagesResponse(plans=[plan_to_pb(p) for p in planned])

    @map_errors
    async def Info(self, request: vision_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> vision_pb2.InfoResponse:
        info = self._require().info()
        return vision_pb2.InfoResponse(
            model_id=info.model_id, fingerprint=info.fingerprint, hidden_size=info.hidden_size,
            tokens_per_tile=info.tokens_per_tile, image_size=info.image_size, dtype=info.dtype,
            default_tiling=tiling_to_pb(info.default_tiling), max_tiles_limit=info.max_tiles_limit,
            max_image_bytes=info.max_image_bytes, max_image_pixels=info.max_image_pixels,
            max_images_per_request=info.max_images_per_request, ps_version=info.ps_version,
            downsample_ratio=info.downsample_ratio, device=info.device, batching=batching_to_pb(info.batching),
            decode=decode_to_pb(info.decode), max_image_side=info.max_image_side, max_jpeg_scans=info.max_jpeg_scans,
            embedding_dtype=info.embedding_dtype,
        )
