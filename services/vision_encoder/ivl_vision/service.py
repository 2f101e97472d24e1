"""The vision encoder's domain service (no proto here): encode images, plan tiles, describe the model.

Admission comes first: every image of a request is planned from its header (read in a sandboxed
worker), and the plans are checked against the caller's ImageBudget and the queue limit before any
image is decoded. Then each image reserves its pixels from the global PixelBudget and is decoded and
tiled in a sandboxed worker (ivl_vision.preprocess); a failing image cancels the request's other
decodes (their workers are killed). The tiles go to the shared TileBatcher, so tiles of concurrent
requests share forwards.
An image's embedding is (num_tiles * tokens_per_tile, llm_hidden) in the encoder's dtype; bfloat16
travels as its uint16 bit pattern with dtype name "bfloat16" (see ivl_proto.dtypes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ivl_proto.dtypes import name_of_array
from ivl_proto.errors import ErrorCode, ServingError, invalid
from ivl_proto.image_budget import ImageBudget, check_images
from ivl_proto.image_budget import PlannedImage as BudgetedImage
from ivl_proto.tiling_limits import MAX_TILES_LIMIT
from ivl_proto.worker_pool import PoolStats
from opentelemetry import trace

from ivl_vision.admission import BudgetStats, PixelBudget
from ivl_vision.batching import BatcherStats, TileBatcher
from ivl_vision.encode_pipeline import EncodePipeline
from ivl_vision.preprocess import PreprocessedImage, Preprocessor
from ivl_vision.settings import VisionSettings
from ivl_vision.tiling import TilePlan, TilingConfig, plan_tiles

MAX_PLANS_PER_REQUEST = 1024


@dataclass(frozen=True)
class TilingRequest:
    """Tiling options as a caller sent them; None = take the next level's value."""

    max_tiles: int | None = None
    min_tiles: int | None = None
    use_thumbnail: bool | None = None

    def over(self, base: TilingRequest) -> TilingRequest:
        return TilingRequest(
            self.max_tiles if self.max_tiles is not None else base.max_tiles,
            self.min_tiles if self.min_tiles is not None else base.min_tiles,
            self.use_thumbnail if self.use_thumbnail is not None else base.use_thumbnail,
        )


@dataclass(frozen=True)
class ImageRequest:
    data: bytes
    tiling: TilingRequest = TilingRequest()


@dataclass(frozen=True)
class PlannedImage:
    plan: TilePlan
    tiling: TilingConfig  # the effective options the plan was made with
    num_tokens: int


@dataclass(frozen=True)
class EncodedImage:
    embedding: np.ndarray  # (num_tiles * tokens_per_tile, hidden); uint16 bit pattern for bfloat16
    dtype: str
    planned: PlannedImage


@dataclass(frozen=True)
class EncodeResult:
    images: list[EncodedImage]
    preprocess_s: float
    encode_s: float
    fingerprint: str


@dataclass(frozen=True)
class ServiceInfo:
    model_id: str
    fingerprint: str
    hidden_size: int
    tokens_per_tile: int
    image_size: int
    dtype: str
    device: str
    default_tiling: TilingConfig
    max_tiles_limit: int
    max_image_bytes: int
    max_image_pixels: int
    max_images_per_request: int
    ps_version: str
    downsample_ratio: float
    batching: BatchingInfo
    decode: DecodeInfo
    max_image_side: int
    max_jpeg_scans: int
    embedding_dtype: str


@dataclass(frozen=True)
class DecodeInfo:
    workers: int
    busy_workers: int
    pool: PoolStats
    pixels_in_flight: int
    max_pixels_in_flight: int
    budget: BudgetStats


@dataclass(frozen=True)
class BatchingInfo:
    enabled: bool
    max_batch_tiles: int
    max_wait_ms: float
    max_queued_tiles: int
    queued_tiles: int
    stats: BatcherStats


def make_encode_fn(encoder: Any, dtype: str, device: str, output_dtype: str | None = None) -> EncodePipeline:
    """The batcher's encode function: numpy pixels in, numpy (T, tokens, hidden) out in `output_dtype` (default:
    the compute dtype), cast on the device before the copy to the host (ivl_vision.encode_pipeline).

    Pixels may be float32, float16 or bfloat16 bit patterns (uint16), as the Preprocessor makes them.
    """
    return EncodePipeline(encoder, dtype, device, output_dtype)


def embedding_fingerprint(model_fingerprint: str, compute_dtype: str, embedding_dtype: str) -> str:
    """The model's fingerprint, or (when embeddings are cast to another dtype) one that differs with that dtype:
    cache keys must never mix embeddings of two dtypes."""
    if embedding_dtype == compute_dtype:
        return model_fingerprint
    return hashlib.sha256(f"{model_fingerprint}|embeddings:{embedding_dtype}".encode()).hexdigest()[: len(model_fingerprint)]


def default_tiling(settings: VisionSettings, info: Any) -> TilingConfig:
    """Server defaults: the settings where given, else the checkpoint's config."""
    dynamic = bool(getattr(info, "dynamic_image_size", True))
    max_tiles = settings.max_tiles or (int(info.default_max_tiles) if dynamic else 1)
    min_tiles = settings.min_tiles or (int(info.default_min_tiles) if dynamic else 1)
    thumbnail = settings.use_thumbnail if settings.use_thumbnail is not None else bool(info.use_thumbnail)
    return TilingConfig(
        image_size=int(info.image_size), min_tiles=min(min_tiles, max_tiles), max_tiles=max_tiles,
        use_thumbnail=thumbnail,
    )


class VisionService:
    """Encode / plan / info over a loaded encoder, a Preprocessor, a PixelBudget and a TileBatcher."""

    def __init__(
        self, settings: VisionSettings, encoder: Any, preprocessor: Preprocessor, batcher: TileBatcher,
        pixel_budget: PixelBudget | None = None, embedding_dtype: str | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.tracer = tracer or trace.NoOpTracer()
        self.encoder = encoder
        self.preprocessor = preprocessor
        self.batcher = batcher
        self.pixel_budget = pixel_budget or PixelBudget(
            settings.max_decode_pixels_in_flight, settings.decode_queue_timeout_s,
            light_pixels=settings.decode_light_pixels, light_reserve=4 * settings.decode_light_pixels,
        )
        self.model = encoder.info
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.embedding_dtype = embedding_dtype or self.dtype
        self.fingerprint = embedding_fingerprint(str(self.model.fingerprint), self.dtype, self.embedding_dtype)
        self.default_tiling = default_tiling(settings, self.model)
        self.tokens_per_tile = int(self.model.tokens_per_tile)

    def tiling_for(self, request: TilingRequest, what: str) -> TilingConfig:
        """Apply a caller's options over the defaults; a bad option names `what` it belonged to."""
        try:
            return self.default_tiling.with_overrides(
                max_tiles=request.max_tiles, min_tiles=request.min_tiles, use_thumbnail=request.use_thumbnail
            )
        except ServingError as error:
            raise ServingError(error.code, f"{what}: {error.message}") from error

    def _planned(self, plan: TilePlan, tiling: TilingConfig) -> PlannedImage:
        return PlannedImage(plan, tiling, plan.num_tiles * self.tokens_per_tile)

    def _check_count(self, count: int, limit: int, what: str, setting: str = "") -> None:
        if count == 0:
            raise invalid(f"the request has no {what}; send at least one")
        if count > limit:
            raise invalid(f"the request has {count} {what}; the limit is {limit}{setting}")

    def _image_tilings(self, images: Sequence[ImageRequest], request: TilingRequest) -> list[TilingConfig]:
        self.tiling_for(request, "request tiling options")
        return [self.tiling_for(image.tiling.over(request), f"image {i}") for i, image in enumerate(images)]

    async def _probe_all(self, images: Sequence[ImageRequest], configs: Sequence[TilingConfig]) -> list[TilePlan]:
        """Every image's plan from its header (in the sandbox); the first failing image by index decides."""
        outcomes = await asyncio.gather(
            *(self._probe(i, image.data, config) for i, (image, config) in enumerate(zip(images, configs, strict=True))),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [plan for plan in outcomes if isinstance(plan, TilePlan)]

    async def _probe(self, index: int, data: bytes, config: TilingConfig) -> TilePlan:
        if not data:
            raise invalid(f"image {index}: the image data is empty; send the encoded file bytes")
        try:
            return await self.preprocessor.plan(data, config)
        except ServingError as error:
            raise ServingError(error.code, f"image {index}: {error.message}") from error

    def _admit(self, plans: Sequence[TilePlan], budget: ImageBudget) -> None:
        check_images(
            [BudgetedImage(f"image {i}", p.original_width, p.original_height, p.num_tiles,
                           p.num_tiles * self.tokens_per_tile) for i, p in enumerate(plans)],
            budget,
        )
        tiles = sum(plan.num_tiles for plan in plans)
        if tiles > self.batcher.max_queued_tiles:
            raise invalid(
                f"the request needs {tiles} tiles; one request may hold at most {self.batcher.max_queued_tiles} "
                "(IVL_VISION_MAX_QUEUED_TILES); lower max_tiles or send fewer images"
            )

    async def encode_images(
        self, images: Sequence[ImageRequest], tiling: TilingRequest, budget: ImageBudget | None = None
    ) -> EncodeResult:
        self._check_count(
            len(images), self.settings.max_images_per_request, "images", " (IVL_VISION_MAX_IMAGES_PER_REQUEST)"
        )
        configs = self._image_tilings(images, tiling)
        started = time.perf_counter()
        with self.tracer.start_as_current_span("ivl.vision.decode", attributes={"ivl.images": len(images)}) as span:
            plans = await self._probe_all(images, configs)
            self._admit(plans, budget or ImageBudget())
            span.set_attribute("ivl.tiles", sum(plan.num_tiles for plan in plans))
            preprocessed = await self._decode_all(images, configs, plans)
        encode_started = time.perf_counter()
        with self.tracer.start_as_current_span("ivl.vision.encode", attributes={"ivl.queued_tiles": self.batcher.queued_tiles}):
            embeddings = await self.batcher.encode_many([p.pixels for p in preprocessed])
        done = time.perf_counter()
        encoded = [
            EncodedImage(embedding, name_of_array(embedding, "the encoder output"), self._planned(p.plan, config))
            for embedding, p, config in zip(embeddings, preprocessed, configs, strict=True)
        ]
        return EncodeResult(encoded, encode_started - started, done - encode_started, self.fingerprint)

    async def _decode_all(
        self, images: Sequence[ImageRequest], configs: Sequence[TilingConfig], plans: Sequence[TilePlan]
    ) -> list[PreprocessedImage]:
        """Decode + tile every image concurrently; the first failure cancels (kills) the others' decodes."""
        tasks = [
            asyncio.ensure_future(self._decode(i, image.data, config, plan))
            for i, (image, config, plan) in enumerate(zip(images, configs, plans, strict=True))
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:  # a failure, or the caller gone: stop the decodes still running
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:  # the first failing image (by index) decides the error
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]

    async def _decode(self, index: int, data: bytes, config: TilingConfig, plan: TilePlan) -> PreprocessedImage:
        size = (plan.original_width, plan.original_height)
        try:
            async with self.pixel_budget.reserve(size[0] * size[1]):
                return await self.preprocessor.tile(data, config, size)
        except ServingError as error:
            raise ServingError(error.code, f"image {index}: {error.message}") from error

    async def plan_images(
        self, images: Sequence[ImageRequest], sizes: Sequence[tuple[int, int]], tiling: TilingRequest
    ) -> list[PlannedImage]:
        """Plans for images (from their headers) then bare (width, height) sizes; no encoding."""
        self._check_count(len(images) + len(sizes), MAX_PLANS_PER_REQUEST, "images or sizes")
        configs = self._image_tilings(images, tiling)
        plans = [self._planned(plan, config)
                 for plan, config in zip(await self._probe_all(images, configs), configs, strict=True)]
        size_config = self.tiling_for(tiling, "request tiling options")
        for index, (width, height) in enumerate(sizes):
            self._check_size(index, width, height)
            plans.append(self._planned(plan_tiles(width, height, size_config), size_config))
        return plans

    def _check_size(self, index: int, width: int, height: int) -> None:
        if width < 1 or height < 1:
            raise invalid(f"size {index}: {width}x{height} is not a valid image size; both must be >= 1")
        limit = self.settings.max_image_pixels
        if width * height > limit:
            raise ServingError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"size {index}: {width}x{height} = {width * height / 1e6:.1f} MP; the limit is {limit / 1e6:.1f} MP",
            )

    def info(self) -> ServiceInfo:
        m = self.model
        limits = self.preprocessor.limits
        return ServiceInfo(
            model_id=str(m.model_id), fingerprint=self.fingerprint, hidden_size=int(m.llm_hidden_size),
            tokens_per_tile=self.tokens_per_tile, image_size=int(m.image_size), dtype=self.dtype,
            device=str(m.device), default_tiling=self.default_tiling, max_tiles_limit=MAX_TILES_LIMIT,
            max_image_bytes=self.settings.max_image_bytes, max_image_pixels=self.settings.max_image_pixels,
            max_images_per_request=self.settings.max_images_per_request, ps_version=str(m.ps_version),
            downsample_ratio=float(m.downsample_ratio), batching=self.batching_info(), decode=self.decode_info(),
            max_image_side=limits.max_side, max_jpeg_scans=limits.max_jpeg_scans,
            embedding_dtype=self.embedding_dtype,
        )

    def batching_info(self) -> BatchingInfo:
        b = self.batcher
        return BatchingInfo(
            b.batching, b.max_batch_tiles, b.max_wait_s * 1000.0, b.max_queued_tiles, b.queued_tiles,
            dataclasses.replace(b.stats),
        )

    def decode_info(self) -> DecodeInfo:
        pool, budget = self.preprocessor.pool, self.pixel_budget
        return DecodeInfo(
            pool.config.size, pool.busy, dataclasses.replace(pool.stats), budget.in_use, budget.capacity,
            dataclasses.replace(budget.stats),
        )
