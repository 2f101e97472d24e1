"""Concurrent EncodeImages clients against one vision service: the load loop the vision benchmarks share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from ivl_proto.vision.v1 import vision_pb2, vision_pb2_grpc


async def encode_clients(
    stub: vision_pb2_grpc.VisionEncoderStub, requests: Sequence[vision_pb2.EncodeImagesRequest], clients: int,
    total: int,
) -> tuple[int, list[float]]:
    """`clients` loops share `total` calls (call i sends requests[i % len(requests)]); returns (tiles encoded,
    latency of each call in seconds)."""
    counter = iter(range(total))
    latencies: list[float] = []
    tiles = 0

    async def client() -> None:
        nonlocal tiles
        for index in counter:
            started = time.perf_counter()
            response = await stub.EncodeImages(requests[index % len(requests)], timeout=600)
            latencies.append(time.perf_counter() - started)
            tiles += sum(image.plan.num_tiles for image in response.images)

    await asyncio.gather(*(client() for _ in range(clients)))
    return tiles, latencies
