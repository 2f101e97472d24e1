"""Fixtures for the vision gRPC tests: a real server on loopback port 0 over a real tiny checkpoint."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.vision.v1 import vision_pb2_grpc
from ivl_vision.server import VisionServer
from PIL import Image
from support.vision_server import vision_server_in_thread

MAX_IMAGES = 4  # small, so the "too many images" case is cheap (test_vision_grpc.py repeats it)


@pytest.fixture(scope="module")
def vision_server(tiny_original: Path) -> Iterator[tuple[str, VisionServer]]:
    """One server per test module (its own thread and loop): (address, VisionServer)."""
    with vision_server_in_thread(
        tiny_original, max_images_per_request=MAX_IMAGES, batch_wait_ms=2.0, max_batch_tiles=64
    ) as running:
        yield running


@pytest.fixture
async def vision_stub(vision_server: tuple[str, VisionServer]) -> AsyncIterator[vision_pb2_grpc.VisionEncoderStub]:
    address, _ = vision_server
    async with grpc.aio.insecure_channel(address, options=message_size_options()) as channel:
        yield vision_pb2_grpc.VisionEncoderStub(channel)


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A real PNG of random noise over a gradient (so every tile differs)."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(gradient + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; the pixel data is a few bytes (never decoded)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def make_png() -> Callable[..., bytes]:
    """make_png(width, height, seed=0) -> PNG bytes."""
    return png_bytes


@pytest.fixture
def make_png_bomb() -> Callable[[int, int], bytes]:
    """make_png_bomb(width, height) -> a tiny PNG whose header claims that size."""
    return png_bomb
