"""Property: any bytes give either a valid RGB image / size / plan or a ServingError, never another
exception. Random bytes, and valid images of every supported format mutated (bytes flipped,
inserted, cut off). Bounded: ~200 examples each, small pixel limits so decodes stay cheap."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ivl_proto.errors import ErrorCode, ServingError
from ivl_vision.image_io import ImageLimits, decode_image, probe_image_size
from ivl_vision.tiling import TilingConfig, plan_tiles
from PIL import Image

# PIL warns (UserWarning) about the corrupt EXIF blocks the mutations produce; that is expected.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
LIMITS = ImageLimits(max_bytes=1 << 20, max_pixels=4_000_000)
FUZZ_SETTINGS = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(5)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8), "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    variants = [
        (rgb, "JPEG", {"quality": 80, "exif": exif.tobytes()}),
        (rgb, "PNG", {}),
        (rgb.convert("P"), "PNG", {"transparency": 3}),
        (rgb.convert("RGBA"), "WEBP", {"quality": 70}),
        (rgb, "GIF", {"save_all": True, "append_images": [rgb.rotate(90)]}),
        (rgb, "BMP", {}),
        (rgb.convert("CMYK"), "TIFF", {}),
        (Image.fromarray(rng.integers(0, 65535, (8, 8), dtype=np.uint16)), "PNG", {}),
    ]
    seeds = []
    for image, fmt, options in variants:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        seeds.append(buffer.getvalue())
    return seeds


SEEDS = _seeds()


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "truncate", "overwrite_header"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "truncate":
            del data[position:]
        else:  # dimensions and chunk lengths live in the first bytes
            offset = draw(st.integers(0, min(40, len(data))))
            data[offset : offset + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(data)


def _check(data: bytes) -> None:
    try:
        width, height = probe_image_size(data, LIMITS)
    except ServingError as error:
        assert error.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.PAYLOAD_TOO_LARGE)
    else:
        assert width >= 1 and height >= 1 and width * height <= LIMITS.max_pixels
        plan = plan_tiles(width, height, TilingConfig(max_tiles=6))
        assert 1 <= plan.num_tiles <= 7
    try:
        image = decode_image(data, LIMITS)
    except ServingError as error:
        assert error.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.PAYLOAD_TOO_LARGE)
        assert error.message
    else:
        assert image.mode == "RGB"
        assert image.width * image.height <= LIMITS.max_pixels
        assert np.asarray(image).shape == (image.height, image.width, 3)


@FUZZ_SETTINGS
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash(data: bytes) -> None:
    _check(data)


@FUZZ_SETTINGS
@given(mutated_images())
def test_mutated_images_never_crash(data: bytes) -> None:
    _check(data)


@pytest.mark.parametrize("index", range(len(SEEDS)))
def test_seeds_decode(index: int) -> None:
    assert decode_image(SEEDS[index], LIMITS).mode == "RGB"
