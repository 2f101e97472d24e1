"""Embeddings for the images of one request: cache, single flight, limits, one EncodeImages for the misses.

Each miss's bytes go to the vision service once, in one EncodeImages call with the request's remaining
ImageBudget (tiles per request, pixels per image, the LLM's context, minus what the cache hits use): the
vision service plans every image from its header and refuses before decoding. The gateway never parses
image bytes; it checks the budget once more over all images when every embedding is in.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass

from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.image_budget import ImageBudget, PlannedImage, check_images

from ivl_gateway.cache import EmbeddingCache
from ivl_gateway.conversation import ChatImage, tiling_per_image
from ivl_gateway.embedding_codec import ImageEmbedding, TilingChoice, image_digest
from ivl_gateway.encode_lock import Claim, EncodeLocks
from ivl_gateway.metrics import GatewayMetrics
from ivl_gateway.settings import GatewaySettings
from ivl_gateway.singleflight import SingleFlight
from ivl_gateway.vision_client import VisionClient

log = logging.getLogger(__name__)


_IMAGE_ERRORS = (ErrorCode.INVALID_ARGUMENT, ErrorCode.PAYLOAD_TOO_LARGE)
_VISION_PREFIX = re.compile(r"image (\d+): ")


def _about_image(error: ServingError, image: ChatImage, vision_index: int) -> ServingError:
    """The vision service's error about its image `vision_index`, named after the request's image once
    ("image 2 (message 0): image is 50000x50000 ..."), not with both prefixes."""
    detail = error.message.removeprefix(f"image {vision_index}: ")
    return ServingError(error.code, f"image {image.image_index} (message {image.message_index}): {detail}")


def _about_failed_image(error: BaseException, jobs: list[_Job]) -> BaseException:
    """An EncodeImages error that names one of its images ("image K: ..."), renamed after the
    request's image; other errors are returned as they are."""
    if not isinstance(error, ServingError) or error.code not in _IMAGE_ERRORS:
        return error
    found = _VISION_PREFIX.match(error.message)
    if found is None or int(found.group(1)) >= len(jobs):
        return error
    index = int(found.group(1))
    return _about_image(error, jobs[index].image, index)


@dataclass(frozen=True)
class ResolvedImage:
    image: ChatImage
    embedding: ImageEmbedding
    cache_hit: bool
    encode_s: float


@dataclass(frozen=True)
class _Job:
    key: str
    data: bytes
    tiling: TilingChoice
    digest: str
    image: ChatImage


class _SharedEncode:
    """One EncodeImages task and how many requests still wait for it; the last one to leave cancels it."""

    def __init__(self, task: asyncio.Task[dict[str, tuple[ImageEmbedding, float]]]) -> None:
        self.task = task
        self.holders = 0

    def hold(self) -> _SharedEncode:
        self.holders += 1
        return self

    def release(self) -> None:
        self.holders -= 1
        if self.holders <= 0 and not self.task.done():
            self.task.cancel()


class EmbeddingResolver:
    """Resolves each image to its embedding: Redis first, then one EncodeImages call for the misses.

    Misses already being encoded for another request are awaited, not encoded again (single flight), in
    this process (singleflight.py) and across the gateway processes sharing Redis (encode_lock.py: the
    owner here waits for another gateway's encode when that one holds the image's lock).
    The encode runs as a task of its own that every request needing one of its images holds an interest
    in: a client that goes away leaves it to the others, and when the last one has gone the encode is
    cancelled, which cancels the EncodeImages call and kills its decodes in the vision service (a
    hostile file sent by clients that hang up costs nothing once they are gone).
    """

    def __init__(
        self, settings: GatewaySettings, cache: EmbeddingCache, vision: VisionClient, metrics: GatewayMetrics
    ) -> None:
        self._settings = settings
        self._cache = cache
        self._vision = vision
        self._metrics = metrics
        self._flight: SingleFlight[str, tuple[ImageEmbedding, float]] = SingleFlight()
        self._encodes: dict[str, _SharedEncode] = {}  # image key -> the encode that is making it
        self._locks = EncodeLocks(settings, cache.store, metrics)  # the same across gateway processes

    async def resolve(
        self,
        images: list[ChatImage],
        tiling: TilingChoice,
        latest_message: int,
        fingerprint: str,
        hidden_size: int,
        context_length: int,
    ) -> list[ResolvedImage]:
        digests = [image_digest(image.data) for image in images]
        remembered = await self._cache.remembered_tiling(fingerprint, digests)
        choices = tiling_per_image(images, tiling, remembered, latest_message)
        keys = [self._cache.key(fingerprint, d, t) for d, t in zip(digests, choices, strict=True)]
        jobs: dict[str, _Job] = {}
        for key, image, choice, digest in zip(keys, images, choices, digests, strict=True):
            jobs.setdefault(key, _Job(key, image.data, choice, digest, image))
        unique = list(jobs)
        cached = dict(zip(unique, await self._cache.get_many(unique, hidden_size), strict=True))
        misses = [k for k in unique if cached[k] is None]
        hit_plans = [cached[k].plan for k in keys if cached[k] is not None]  # type: ignore[union-attr]
        budget = ImageBudget(
            max_total_tiles=self._settings.max_tiles_per_request, used_tiles=sum(p.num_tiles for p in hit_plans),
            max_total_tokens=context_length, used_tokens=sum(p.num_tokens for p in hit_plans),
            max_image_pixels=self._settings.max_image_pixels,
        )
        owned, waiting = self._flight.claim(misses)
        results: dict[str, tuple[ImageEmbedding, float]] = {}
        held: list[_SharedEncode] = []
        try:
            if owned:
                shared = _SharedEncode(asyncio.create_task(
                    self._encode_owned([jobs[k] for k in owned], fingerprint, hidden_size, budget)))
                for key in owned:
                    self._encodes[key] = shared
                shared.task.add_done_callback(lambda _, keys=owned: self._forget(keys))
                held.append(shared.hold())
            for key in waiting:
                if key in self._encodes:
                    held.append(self._encodes[key].hold())
            if owned:
                results.update(await asyncio.shield(held[0].task))
            for key, future in waiting.items():
                self._metrics.singleflight_waits.inc()
                results[key] = await asyncio.shield(future)
        finally:
            for shared in held:
                shared.release()
        plans = {k: hit.plan for k, hit in cached.items() if hit is not None}
        plans.update({k: embedding.plan for k, (embedding, _) in results.items()})
        self._check_limits(images, keys, plans, budget)
        await self._cache.remember_tiling(
            fingerprint,
            [(jobs[k].digest, jobs[k].tiling) for k, img in zip(keys, images, strict=True)
             if img.message_index == latest_message],
        )

        resolved: list[ResolvedImage] = []
        for image, key in zip(images, keys, strict=True):
            hit = cached[key]
            if hit is not None:
                self._metrics.cache_hits.inc()
                resolved.append(ResolvedImage(image, hit, True, 0.0))
            else:
                self._metrics.cache_misses.inc()
                embedding, seconds = results[key]
                resolved.append(ResolvedImage(image, embedding, False, seconds))
            self._metrics.tiles_per_image.observe(resolved[-1].embedding.plan.num_tiles)
        return resolved

    def _forget(self, keys: list[str]) -> None:
        for key in keys:
            self._encodes.pop(key, None)

    def _check_limits(
        self, images: list[ChatImage], keys: list[str], plans: dict[str, common_pb2.ImagePlan], budget: ImageBudget
    ) -> None:
        """The request's budget over all of its images (the vision service checked its own share already)."""
        check_images(
            [PlannedImage(f"image {image.image_index} (message {image.message_index})", plans[key].original_width,
                          plans[key].original_height, plans[key].num_tiles, plans[key].num_tokens)
             for image, key in zip(images, keys, strict=True)],
            ImageBudget(budget.max_total_tiles, 0, budget.max_total_tokens, 0, budget.max_image_pixels),
        )

    async def _encode_owned(
        self, jobs: list[_Job], fingerprint: str, hidden_size: int, budget: ImageBudget
    ) -> dict[str, tuple[ImageEmbedding, float]]:
        """The task making this process's owned misses: resolves or fails each of them for every request
        here that waits for it."""
        try:
            results = await self._encode_across_gateways(jobs, fingerprint, hidden_size, budget)
        except BaseException as error:
            failure = _about_failed_image(error, jobs)
            if isinstance(error, asyncio.CancelledError):  # every request that wanted it left: a latecomer retries
                failure = ServingError(ErrorCode.UNAVAILABLE, "the encode of this image was cancelled; retry")
            for job in jobs:
                self._flight.fail(job.key, failure)
            if failure is error or isinstance(error, asyncio.CancelledError):
                raise
            raise failure from None
        for job in jobs:
            self._flight.resolve(job.key, results[job.key])
        return results

    async def _encode_across_gateways(
        self, jobs: list[_Job], fingerprint: str, hidden_size: int, budget: ImageBudget
    ) -> dict[str, tuple[ImageEmbedding, float]]:
        """One encode per image across every gateway sharing this Redis (encode_lock.py): the images whose
        lock this gateway gets are encoded here, in one call; the others are awaited, and encoded here
        after all if their holder gives up or dies."""
        results: dict[str, tuple[ImageEmbedding, float]] = {}
        pending = {job.key: job for job in jobs}
        while pending:
            claims = await self._locks.claim(list(pending))
            mine = [pending[k] for k, claim in claims.items() if claim is Claim.MINE]
            others = [k for k, claim in claims.items() if claim is not Claim.MINE]
            started = time.perf_counter()
            waiting = asyncio.create_task(self._locks.wait(others)) if others else None
            try:
                if mine:
                    async with self._locks.held([job.key for job in mine], claims):
                        results.update(await self._encode(mine, fingerprint, hidden_size, budget))
                found, free = await waiting if waiting is not None else ({}, [])
            finally:
                if waiting is not None:
                    waiting.cancel()
            waited = time.perf_counter() - started
            for key, value in found.items():
                embedding = self._cache.decode(key, value, hidden_size)
                if embedding is None:  # corrupt or of another width: deleted, then made here
                    await self._cache.store.delete(key)
                    free.append(key)
                else:
                    results[key] = (embedding, waited)
            pending = {key: pending[key] for key in free}
        return results

    async def _encode(
        self, jobs: list[_Job], fingerprint: str, hidden_size: int, budget: ImageBudget
    ) -> dict[str, tuple[ImageEmbedding, float]]:
        """One EncodeImages call for `jobs`; the embeddings are stored before this returns."""
        encoded = await self._vision.encode([(job.data, job.tiling) for job in jobs], budget)
        results: dict[str, tuple[ImageEmbedding, float]] = {}
        for job, embedding in zip(jobs, encoded.embeddings, strict=True):
            if embedding.shape[-1] != hidden_size:
                raise ServingError(
                    ErrorCode.FAILED_PRECONDITION,
                    f"the vision service returned embeddings of width {embedding.shape[-1]}; "
                    f"the LLM's hidden size is {hidden_size}: they are not the same model",
                )
            results[job.key] = (embedding, encoded.seconds)
        if encoded.fingerprint and encoded.fingerprint != fingerprint:
            # A replica of another model answered (a rollout, or a replica restarted with other weights): its
            # embeddings are kept under its own fingerprint, but never mixed into this request.
            await self._cache.put_many(
                [(self._cache.key(encoded.fingerprint, job.digest, job.tiling), results[job.key][0]) for job in jobs])
            self._vision.recheck()
            raise ServingError(
                ErrorCode.FAILED_PRECONDITION,
                f"a vision replica answered with model fingerprint {encoded.fingerprint[:12]}, not "
                f"{fingerprint[:12]} as the other replicas: the gateway does not mix models; it is checking "
                "the replicas again, retry in a few seconds",
            )
        await self._cache.put_many(
            [(self._cache.key(fingerprint, job.digest, job.tiling), results[job.key][0]) for job in jobs]
        )
        return results

    async def close(self) -> None:
        await self._locks.close()
