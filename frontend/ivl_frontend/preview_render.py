"""render_preview(): an untrusted image's bytes -> a small PNG of it with its tile grid drawn.

A pure function (bytes and a plan in, PNG bytes out; no I/O, no globals, arguments that pickle) so
it can run in a worker thread today (preview_pool.py) and in a sandboxed process pool with CPU and
memory limits later. Before any pixel is decoded it refuses what it can see from the header: a
format outside the list, more pixels than the limit, a JPEG with more scans than any encoder writes
(a progressive JPEG whose scans repeat thousands of times costs minutes of CPU in a few hundred KB).
JPEGs are decoded reduced (libjpeg DCT scaling, `Image.draft`): fine for a preview picture, never
for model input (the vision service decodes the full image itself).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from ivl_proto.common.v1 import common_pb2
from PIL import Image, UnidentifiedImageError

from ivl_frontend.tile_preview import PREVIEW_MAX_SIDE, draw_grid

PREVIEW_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
DEFAULT_MAX_PIXELS = 80_000_000  # the gateway's and the vision service's default per-image limit
# libjpeg's own progressive script writes 10 scans, mozjpeg's a few more; 100 is far beyond both.
DEFAULT_MAX_JPEG_SCANS = 100
_SOS = b"\xff\xda"  # start-of-scan marker; inside entropy-coded data 0xFF is always followed by 0x00/RSTn
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class PreviewRefused(ValueError):
    """The image gets no preview picture; the message says why (shown next to its caption)."""


def count_jpeg_scans(data: bytes) -> int:
    """Start-of-scan markers in a JPEG stream (an upper bound: an embedded EXIF thumbnail adds its own)."""
    return data.count(_SOS)


def render_preview(
    data: bytes,
    plan: common_pb2.ImagePlan,
    max_side: int = PREVIEW_MAX_SIDE,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS,
) -> bytes:
    """PNG bytes of the image scaled to fit max_side with the plan's tile grid drawn on it; raises
    PreviewRefused for what must not (or cannot) be decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(io.BytesIO(data), formats=PREVIEW_FORMATS)
    except Image.DecompressionBombError as error:
        raise PreviewRefused(f"too large to preview ({error})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise PreviewRefused(f"not an image the preview can read ({type(error).__name__})") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise PreviewRefused(
                f"{width}×{height} = {width * height / 1e6:.1f} MP; previews stop at {max_pixels / 1e6:.0f} MP"
            )
        if image.format == "JPEG":
            scans = count_jpeg_scans(data)
            if scans > max_jpeg_scans:
                raise PreviewRefused(f"a JPEG with {scans} scans (a decode-time bomb?); previews stop at {max_jpeg_scans}")
            image.draft("RGB", (max_side, max_side))  # decode at 1/2..1/8 scale: a preview only
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image.load()
            picture = draw_grid(_displayable(image), plan, max_side)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as error:
            raise PreviewRefused(f"could not be decoded for the preview ({type(error).__name__}: {error})") from None
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def _displayable(image: Image.Image) -> Image.Image:
    """16-bit and float images scaled to 8 bits (a plain convert("RGB") clips them to white)."""
    if image.mode not in _WIDE_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    peak = float(values.max()) if values.size else 0.0
    scaled = values * (255.0 / peak) if peak > 255 else values
    converted = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")
    converted.info = dict(image.info)  # keeps the EXIF orientation for draw_grid
    return converted
