"""A corpus of hostile and awkward image payloads with the outcome the vision stack must give.

`hostile_corpus()` returns HostileImage(name, data, expected_code, expected_size, message_part):
expected_code None means "decodes to an RGB image of expected_size (after EXIF orientation)";
otherwise the ServingError code the decoder (and every layer above it: the vision gRPC service,
the gateway, the OpenAI API) must answer with, and a fragment of its message. Only PIL, numpy, zlib and
ivl_proto.errors are used, so gateway and load tests can import this without the vision package:
`from support.hostile_images import hostile_corpus` (tests/ is on sys.path through tests/conftest.py).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from ivl_proto.errors import ErrorCode
from PIL import Image

DEFAULT_MAX_BYTES = 32 * 2**20
DEFAULT_MAX_PIXELS = 80_000_000


@dataclass(frozen=True)
class HostileImage:
    name: str
    data: bytes
    expected_code: ErrorCode | None  # None: decodes fine
    expected_size: tuple[int, int] | None = None  # (width, height) after EXIF orientation
    message_part: str = ""  # a fragment the error message must contain

    @property
    def ok(self) -> bool:
        return self.expected_code is None


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth gradient with a little noise: compresses like a photo, not like random data."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-8, 9, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int, height: int, complete: bool, bit_depth: int = 1) -> bytes:
    """A grey PNG of width x height (1 or 16 bits per sample), all black, written with zlib directly.

    complete=True: a fully valid file (every row present; deflate shrinks zeros ~1000x: an 80 MP
    16-bit one is ~160 KB and decodes to 160 MB of samples). complete=False: the header and the first
    rows only, a few KB whatever the size: the decoder must refuse it from the header.
    """
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width * bit_depth + 7) // 8)
    compressor = zlib.compressobj(9)
    rows = height if complete else min(height, 64)
    block = max(1, (1 << 20) // len(row))  # rows per compress call: fast even for 80 M one-pixel rows
    body = b"".join(compressor.compress(row * min(block, rows - top)) for top in range(0, rows, block))
    body += compressor.flush(zlib.Z_FINISH if complete else zlib.Z_SYNC_FLUSH)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body)
        + (_png_chunk(b"IEND", b"") if complete else b"")
    )


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(start, end, marker) of each marker segment of a baseline/progressive JPEG (entropy data included
    in its SOS segment)."""
    position, segments = 2, []
    while position < len(data):
        marker = data[position + 1]
        if marker == 0xD9:
            segments.append((position, len(data), marker))
            break
        end = position + 2 + struct.unpack(">H", data[position + 2 : position + 4])[0]
        if marker == 0xDA:  # entropy-coded data runs to the next marker that is not a stuffed 0xFF or RSTn
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
        segments.append((position, end, marker))
        position = end
    return segments


def progressive_jpeg_bomb(width: int, height: int, extra_scans: int) -> bytes:
    """A decode-time bomb: a flat progressive JPEG of width x height with its last scan (the luma AC
    refinement, a few dozen bytes for a flat image) repeated `extra_scans` more times. libjpeg refines every
    coefficient of the image for each copy: 4000x4000 with 400 extra scans is ~100 KB and takes tens of
    seconds to decode."""
    data = _encode(Image.new("RGB", (width, height), (200, 200, 200)), "JPEG", progressive=True, quality=90)
    segments = _jpeg_segments(data)
    start, end, _ = [seg for seg in segments if seg[2] == 0xDA][-1]
    eoi = segments[-1][0]
    return data[:eoi] + data[start:end] * extra_scans + data[eoi:]


def png_padded_to(size: int) -> bytes:
    """A valid small PNG padded with a private ancillary chunk to exactly `size` bytes."""
    small = _encode(_photo(8, 8), "PNG")
    head, tail = small[:-12], small[-12:]  # tail is the IEND chunk
    padding = max(size - len(small) - 12, 0)
    return head + _png_chunk(b"prVt", b"\x00" * padding) + tail


def gif_frame_bomb(frame_side: int) -> bytes:
    """A GIF whose canvas is 1x1 but whose first frame claims frame_side x frame_side."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, frame_side, frame_side, 0)
    return screen + descriptor + b"\x02\x02\x44\x01\x00" + b"\x3b"


def _exif_rotated_jpeg() -> bytes:
    """Stored 64x32 with EXIF Orientation 6 (rotate 90 clockwise to view): shown 32x64."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_photo(64, 32, seed=3), "JPEG", quality=90, exif=exif.tobytes())


def _sixteen_bit_png() -> bytes:
    values = np.linspace(0, 65535, 64 * 16).astype(np.uint16).reshape(16, 64)
    return _encode(Image.fromarray(values), "PNG")


def _palette_transparency_png() -> bytes:
    image = _photo(32, 32, seed=4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(image, "PNG", transparency=0)


def _animated(fmt: str) -> bytes:
    frames = [_photo(40, 30, seed=s) for s in range(3)]
    options: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 100, "loop": 0}
    if fmt == "WEBP":
        options["lossless"] = True
    return _encode(frames[0], fmt, **options)


def hostile_corpus(
    max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[HostileImage]:
    """The corpus for the given limits (the defaults are ImageLimits' defaults)."""
    jpeg = _encode(_photo(320, 240), "JPEG", quality=85)
    png = _encode(_photo(64, 48, seed=1), "PNG")
    bad = ErrorCode.INVALID_ARGUMENT
    big = ErrorCode.PAYLOAD_TOO_LARGE
    rng = np.random.default_rng(1234)
    corpus = [
        HostileImage("empty", b"", bad, message_part="empty"),
        HostileImage("jpeg_truncated", jpeg[: len(jpeg) // 2], bad, message_part="could not decode image"),
        HostileImage("png_truncated", png[: len(png) // 2], bad, message_part="could not decode image"),
        HostileImage("random_bytes", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), bad),
        HostileImage("text_named_png", b"this is not a picture, whatever its .png name says\n", bad),
        HostileImage(
            "svg",
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
            bad,
            message_part="supported formats: JPEG, PNG, WebP, GIF, BMP, TIFF",
        ),
        HostileImage(
            "png_header_bomb_50000x50000",
            png_bomb(50000, 50000, complete=False),
            big,
            message_part="image is 50000x50000 = 2500.0 MP; the limit is",
        ),
        HostileImage(
            "png_bomb_10000x10000_complete",
            png_bomb(10000, 10000, complete=True),
            big,
            message_part="image is 10000x10000 = 100.0 MP",
        ),
        HostileImage("gif_frame_bomb_30000", gif_frame_bomb(30000), big),
        HostileImage(
            "png_1x79999999", png_bomb(1, 79_999_999, complete=False), big,
            message_part="image is 1x79999999; its longest side may be at most 65535 pixels",
        ),
        HostileImage(
            "jpeg_600_scans", progressive_jpeg_bomb(64, 64, 600), big, message_part="scans; the limit is 500",
        ),
        HostileImage("png_zero_size", png_bomb(0, 0, complete=False), bad),
        HostileImage("over_byte_limit", png_padded_to(max_bytes + 1), big, message_part="bytes"),
        HostileImage("jpeg_photo", jpeg, None, (320, 240)),
        HostileImage("png_1x1", _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), None, (1, 1)),
        HostileImage("png_1x20000", _encode(Image.new("L", (1, 20000), 90), "PNG"), None, (1, 20000)),
        HostileImage("png_20000x1", _encode(Image.new("L", (20000, 1), 90), "PNG"), None, (20000, 1)),
        HostileImage("jpeg_cmyk", _encode(_photo(48, 40).convert("CMYK"), "JPEG"), None, (48, 40)),
        HostileImage("png_16bit_grey", _sixteen_bit_png(), None, (64, 16)),
        HostileImage("png_palette_transparency", _palette_transparency_png(), None, (32, 32)),
        HostileImage("png_rgba", _encode(_photo(30, 20).convert("RGBA"), "PNG"), None, (30, 20)),
        HostileImage("gif_animated", _animated("GIF"), None, (40, 30)),
        HostileImage("webp_animated", _animated("WEBP"), None, (40, 30)),
        HostileImage("webp", _encode(_photo(50, 40), "WEBP", quality=80), None, (50, 40)),
        HostileImage("bmp", _encode(_photo(20, 10), "BMP"), None, (20, 10)),
        HostileImage("tiff", _encode(_photo(20, 10), "TIFF"), None, (20, 10)),
        HostileImage("jpeg_exif_rotated", _exif_rotated_jpeg(), None, (32, 64)),
    ]
    if max_pixels < DEFAULT_MAX_PIXELS:
        corpus = [
            item
            for item in corpus
            if item.expected_size is None or item.expected_size[0] * item.expected_size[1] <= max_pixels
        ]
    return corpus
