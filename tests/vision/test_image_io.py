"""ivl_vision.image_io: limits before decode, every mode to RGB, EXIF orientation, clear errors."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from ivl_proto.errors import ErrorCode, ServingError
from ivl_vision.image_io import ImageLimits, decode_image, probe_image_size
from PIL import Image
from support.hostile_images import HostileImage, hostile_corpus, png_bomb

CORPUS = hostile_corpus()
LIMITS = ImageLimits()


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("item", CORPUS, ids=[item.name for item in CORPUS])
def test_corpus_decode_outcome(item: HostileImage) -> None:
    if item.ok:
        image = decode_image(item.data, LIMITS)
        assert image.mode == "RGB"
        assert image.size == item.expected_size
        assert probe_image_size(item.data, LIMITS) == item.expected_size
        return
    with pytest.raises(ServingError) as caught:
        decode_image(item.data, LIMITS)
    assert caught.value.code is item.expected_code, caught.value.message
    assert item.message_part in caught.value.message
    if item.expected_code is ErrorCode.INVALID_ARGUMENT:
        assert "supported formats: JPEG, PNG, WebP, GIF, BMP, TIFF" in caught.value.message
    else:  # the limits are known from the header: the probe refuses too
        with pytest.raises(ServingError) as probed:
            probe_image_size(item.data, LIMITS)
        assert probed.value.code is ErrorCode.PAYLOAD_TOO_LARGE


def test_bomb_is_refused_from_the_header_in_milliseconds() -> None:
    bomb = png_bomb(50000, 50000, complete=False)
    assert len(bomb) < 4096
    start = time.perf_counter()
    with pytest.raises(ServingError) as caught:
        decode_image(bomb, LIMITS)
    assert time.perf_counter() - start < 0.5  # a decode would take minutes and 2.5 GB
    assert caught.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert caught.value.message == "image is 50000x50000 = 2500.0 MP; the limit is 80.0 MP"


def test_limits_are_ours_not_pils_global() -> None:
    """PIL's Image.open would refuse 2500 MP by its global; our limit decides (and stays put)."""
    before = Image.MAX_IMAGE_PIXELS
    generous = ImageLimits(max_pixels=3_000_000_000)
    assert probe_image_size(png_bomb(50000, 50000, complete=False), generous) == (50000, 50000)
    strict = ImageLimits(max_pixels=1000)
    with pytest.raises(ServingError, match=r"image is 40x30 = 1200 pixels; the limit is 1000 pixels"):
        decode_image(_encode(Image.new("RGB", (40, 30)), "PNG"), strict)
    assert before == Image.MAX_IMAGE_PIXELS


def test_messages_just_over_the_limit_show_exact_numbers() -> None:
    limits = ImageLimits(max_bytes=32 * 2**20, max_pixels=80_000_000)
    with pytest.raises(ServingError) as caught:
        probe_image_size(b"\x00" * (32 * 2**20 + 1), limits)
    assert (
        caught.value.message == "image is 33554433 bytes (32.0 MiB); the limit is 33554432 bytes (32.0 MiB)"
    )
    assert probe_image_size(png_bomb(10000, 8000, complete=False), limits) == (
        10000,
        8000,
    )  # exactly the limit
    with pytest.raises(ServingError) as caught:
        probe_image_size(png_bomb(10001, 8000, complete=False), limits)
    assert caught.value.message == "image is 10001x8000 = 80008000 pixels; the limit is 80000000 pixels"


def test_byte_limit_is_checked_first() -> None:
    limits = ImageLimits(max_bytes=1000)
    data = b"\x00" * 1001  # not an image at all: the size is still what is reported
    with pytest.raises(ServingError) as caught:
        probe_image_size(data, limits)
    assert caught.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert caught.value.message == "image is 1001 bytes; the limit is 1000 bytes"


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0, 128, 257, 32768, 65280, 65535]], dtype=np.uint16)
    image = decode_image(_encode(Image.fromarray(values), "PNG"), LIMITS)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 0, 1, 128, 254, 255]
    assert np.asarray(image)[0, :, 1].tolist() == np.asarray(image)[0, :, 2].tolist()


def test_float_tiff_in_unit_range_is_scaled() -> None:
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    image = decode_image(_encode(Image.fromarray(values, "F"), "TIFF"), LIMITS)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 128, 255]


def test_modes_follow_the_references_convert_rgb() -> None:
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), "RGB")
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (24, 32), dtype=np.uint8), "L"))
    samples = {
        "rgba_png": _encode(rgba, "PNG"),
        "la_png": _encode(rgba.convert("LA"), "PNG"),
        "grey_png": _encode(rgb.convert("L"), "PNG"),
        "bilevel_png": _encode(rgb.convert("1"), "PNG"),
        "palette_png": _encode(rgb.convert("P"), "PNG"),
        "palette_transparent_png": _encode(rgb.convert("P"), "PNG", transparency=5),
        "cmyk_jpeg": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "cmyk_tiff": _encode(rgb.convert("CMYK"), "TIFF"),
        "gif": _encode(rgb, "GIF"),
        "bmp": _encode(rgb, "BMP"),
    }
    for name, data in samples.items():
        ours = np.asarray(decode_image(data, LIMITS))
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(ours, reference), name


def test_alpha_background_option_composites() -> None:
    image = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    image.putpixel((1, 0), (10, 20, 30, 255))
    data = _encode(image, "PNG")
    dropped = np.asarray(decode_image(data, LIMITS))
    assert dropped.tolist() == [[[10, 20, 30], [10, 20, 30]]]
    white = np.asarray(decode_image(data, ImageLimits(alpha_background=(255, 255, 255))))
    assert white.tolist() == [[[255, 255, 255], [10, 20, 30]]]


def test_exif_orientation_is_applied_and_can_be_turned_off() -> None:
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    for orientation, transpose in [
        (6, Image.Transpose.ROTATE_270),
        (8, Image.Transpose.ROTATE_90),
        (3, Image.Transpose.ROTATE_180),
        (2, Image.Transpose.FLIP_LEFT_RIGHT),
    ]:
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _encode(stored, "PNG", exif=exif.tobytes())
        upright = decode_image(data, LIMITS)
        assert np.array_equal(np.asarray(upright), np.asarray(stored.transpose(transpose))), orientation
        assert probe_image_size(data, LIMITS) == upright.size
        as_stored = ImageLimits(apply_exif_orientation=False)
        assert decode_image(data, as_stored).size == (40, 20)
        assert probe_image_size(data, as_stored) == (40, 20)


def test_first_frame_of_animations() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    for fmt, options in (("GIF", {}), ("WEBP", {"lossless": True})):
        data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **options)
        assert np.asarray(decode_image(data, LIMITS))[4, 4].tolist() == [255, 0, 0], fmt


def test_unsupported_format_is_named() -> None:
    ico = _encode(Image.new("RGB", (16, 16)), "ICO")  # PIL reads it; we do not accept it
    with pytest.raises(
        ServingError, match="could not decode image: not a recognised image; supported formats"
    ):
        decode_image(ico, LIMITS)


def test_limits_are_validated() -> None:
    with pytest.raises(ServingError, match="must be positive"):
        ImageLimits(max_pixels=0)
    with pytest.raises(ServingError, match="alpha_background"):
        ImageLimits(alpha_background=(255, 255, 300))
