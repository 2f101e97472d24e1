"""Helpers of the gateway tests: settings for the test stack, unique images, vision-side counters."""

from __future__ import annotations

import base64
import io
import itertools

import grpc
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.vision.v1 import vision_pb2, vision_pb2_grpc
from PIL import Image

# Limits small enough to hit in tests; tiles kept low so the tiny encoder stays fast on 2 cores.
GATEWAY_OVERRIDES = {
    "default_max_tiles": 2,
    "max_images_per_request": 6,
    "max_tiles_per_request": 40,
    "max_image_pixels": 4_000_000,
    "max_request_bytes": 3 * 2**20,
    "model_aliases": ["ivl"],  # the tests name the model "ivl"; the served name is the checkpoint folder's
    "detail_high_max_tiles": 6,
}
LLM_OVERRIDES = {"context_length": 8192, "max_concurrency": 2, "max_queue": 8}


_colors = itertools.count(1)


def new_png(width: int = 500, height: int = 320) -> bytes:
    """A PNG no other test has sent (unique colour), so it is new to the cache."""
    n = next(_colors)
    image = Image.new("RGB", (width, height), ((n * 37) % 256, (n * 91) % 256, (n * 13 + n // 256) % 256))
    image.putpixel((n % width, 0), (n % 256, 255 - n % 256, 7))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def vision_images_seen(address: str) -> int:
    """Evidence from the vision service itself: images submitted to its encoder since start."""
    with grpc.insecure_channel(address, options=message_size_options()) as channel:
        info = vision_pb2_grpc.VisionEncoderStub(channel).Info(vision_pb2.InfoRequest(), timeout=10)
    return int(info.batching.requests)


def metric(gateway, name: str, **labels: str) -> float:
    return gateway.metrics.registry.get_sample_value(name, labels) or 0.0
