"""Image bytes -> RGB PIL image, with the limits checked before any pixel is decoded.

Order of checks: byte size, then the header (format among JPEG/PNG/WebP/GIF/BMP/TIFF, width x
height against max_pixels, the longest side against max_side, a JPEG's scan count against
max_jpeg_scans), then the full decode (first frame of animations), then the mode conversion to RGB
and the EXIF orientation. Every failure is a ServingError: PAYLOAD_TOO_LARGE for the limits,
INVALID_ARGUMENT for anything that is not a decodable image. See docs/tiling.md.

These functions parse untrusted bytes: the vision service runs them only inside sandboxed worker
processes (ivl_vision.decode_worker), where a CPU-time and a memory limit bound what any file costs.
Two limits here refuse the known cheap-file attacks early and with a clear message:
- max_side: PIL's BICUBIC resize allocates ~32 bytes of filter coefficients per source pixel of the
  longest side, and an intermediate of (output width x source height); a 1 x 79,999,999 PNG (under
  the pixel limit) needs gigabytes. A side of at most 65535 px (JPEG's own maximum) keeps both small.
- max_jpeg_scans: each scan of a progressive JPEG costs a pass over the whole image, and a scan can
  be a few bytes; libjpeg-turbo's guard against such files is a scan limit (djpeg -maxscans), 500 here.

PIL's own decompression-bomb check reads the module global Image.MAX_IMAGE_PIXELS inside
Image.open. We do not mutate that global: the header is parsed through the format's registered
opener (the same one Image.open uses), and our own limit is applied to its size. PIL's check still
runs in the one place it is internal to a plugin (a GIF frame larger than its canvas) and is mapped
to PAYLOAD_TOO_LARGE.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from ivl_proto.errors import ErrorCode, ServingError, invalid
from PIL import (
    BmpImagePlugin,  # noqa: F401  (imported to register the format)
    ExifTags,
    GifImagePlugin,  # noqa: F401
    Image,
    JpegImagePlugin,  # noqa: F401
    PngImagePlugin,  # noqa: F401
    TiffImagePlugin,  # noqa: F401
    WebPImagePlugin,  # noqa: F401
)

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
SUPPORTED_FORMATS_TEXT = "JPEG, PNG, WebP, GIF, BMP, TIFF"
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
# EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class ImageLimits:
    """Limits and decoding choices for untrusted image bytes.

    apply_exif_orientation: rotate/flip by the EXIF Orientation tag (phone photos are stored
      sideways); the reference InternVL code does not, set False to match it bit for bit.
    alpha_background: None drops alpha like the reference's .convert('RGB') (the colour under
      transparent pixels shows); an (r, g, b) composites transparent images on that colour.
    """

    max_bytes: int = 32 * 2**20
    max_pixels: int = 80_000_000
    apply_exif_orientation: bool = True
    alpha_background: tuple[int, int, int] | None = None
    max_side: int = 65535
    max_jpeg_scans: int = 500

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.max_side, self.max_jpeg_scans) < 1:
            raise invalid(
                f"image limits must be positive, got max_bytes={self.max_bytes}, max_pixels={self.max_pixels}, "
                f"max_side={self.max_side}, max_jpeg_scans={self.max_jpeg_scans}"
            )
        background = self.alpha_background
        if background is not None and (
            len(background) != 3 or not all(0 <= int(c) <= 255 for c in background)
        ):
            raise invalid(f"alpha_background must be three values in 0..255, got {background!r}")


def _undecodable(reason: str) -> ServingError:
    return ServingError(
        ErrorCode.INVALID_ARGUMENT,
        f"could not decode image: {reason}; supported formats: {SUPPORTED_FORMATS_TEXT}",
    )


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels} pixels"


def _too_many_pixels(width: int, height: int, limits: ImageLimits) -> ServingError:
    value, limit = _megapixels(width * height), _megapixels(limits.max_pixels)
    if value == limit:  # just over the limit: rounding would hide the difference
        value, limit = f"{width * height} pixels", f"{limits.max_pixels} pixels"
    return ServingError(
        ErrorCode.PAYLOAD_TOO_LARGE, f"image is {width}x{height} = {value}; the limit is {limit}"
    )


def _too_long_side(width: int, height: int, limits: ImageLimits) -> ServingError:
    return ServingError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"image is {width}x{height}; its longest side may be at most {limits.max_side} pixels "
        "(an aspect ratio this extreme cannot be tiled)",
    )


def _byte_size(size: int) -> str:
    return f"{size} bytes ({size / 2**20:.1f} MiB)" if size >= 2**17 else f"{size} bytes"


def _bomb(error: Exception, limits: ImageLimits) -> ServingError:
    return ServingError(
        ErrorCode.PAYLOAD_TOO_LARGE,
        f"image is too large to decode safely ({error}); the limit is {_megapixels(limits.max_pixels)}",
    )


def _check_bytes(data: bytes, limits: ImageLimits) -> None:
    if len(data) > limits.max_bytes:
        raise ServingError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"image is {_byte_size(len(data))}; the limit is {_byte_size(limits.max_bytes)}",
        )
    if not data:
        raise _undecodable("the image is empty (0 bytes)")


def _open_header(data: bytes, limits: ImageLimits) -> Image.Image:
    """Parse the header with the first supported format that accepts it; pixels not decoded."""
    prefix = data[:16]
    reason = "not a recognised image"
    for name in SUPPORTED_FORMATS:
        opener = Image.OPEN.get(name)
        if opener is None:
            continue
        factory, accept = opener
        if accept is not None and not accept(prefix):
            continue
        try:
            image = factory(io.BytesIO(data), "")
        except Image.DecompressionBombError as error:
            raise _bomb(error, limits) from error
        except MemoryError:  # out of the worker's memory: not a format problem
            raise
        except Exception as error:  # any parser failure means "not this format / corrupt header"
            reason = f"{name} header is invalid ({error})"
            continue
        width, height = image.size
        if width * height > limits.max_pixels:
            image.close()
            raise _too_many_pixels(width, height, limits)
        if max(width, height) > limits.max_side:
            image.close()
            raise _too_long_side(width, height, limits)
        if name == "JPEG":
            _check_jpeg_scans(data, limits)
        return image
    raise _undecodable(reason)


def _first_scan_offset(data: bytes) -> int | None:
    """Offset of the first SOS marker, walking the header's marker segments (their lengths skip
    APPn payloads such as EXIF thumbnails, which hold scans of their own)."""
    position = 2  # after SOI
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xDA:
            return position
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None


def _check_jpeg_scans(data: bytes, limits: ImageLimits) -> None:
    """Refuse a JPEG with more scans than max_jpeg_scans. After the first SOS, a 0xFF 0xDA pair can
    only be a marker (entropy-coded data stuffs every 0xFF with 0x00), so a count is exact."""
    first = _first_scan_offset(data)
    if first is None:
        return  # no scan: PIL reports the truncated file
    scans = data.count(b"\xff\xda", first)
    if scans > limits.max_jpeg_scans:
        raise ServingError(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the JPEG has {scans} scans; the limit is {limits.max_jpeg_scans} (progressive JPEGs have about 10; "
            "files with thousands of scans take minutes to decode)",
        )


def _header_orientation(image: Image.Image) -> int:
    """EXIF Orientation read from the header only (a PNG's eXIf after the pixels is ignored)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # PngImageFile.getexif() would decode the whole image to look further
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # corrupt EXIF: show the image as stored rather than refuse it
        return 1
    return value if value in _ORIENTATION_FIX else 1


def probe_image_size(data: bytes, limits: ImageLimits) -> tuple[int, int]:
    """(width, height) as the image will be decoded (after EXIF orientation), from the header."""
    _check_bytes(data, limits)
    with _open_header(data, limits) as image:
        width, height = image.size
        if limits.apply_exif_orientation and _header_orientation(image) >= 5:
            return height, width
        return width, height


_SCALE_ROWS_PIXELS = 1 << 20  # pixels converted per band: bounds the temporaries of a 16-bit image


def _scale_high_depth(image: Image.Image) -> Image.Image:
    """16/32-bit integer grey -> 8-bit by rounding v * 255 / 65535 (PIL's convert clips instead).

    Band by band, in uint32: an 80 MP 16-bit PNG needs its 160 MB of samples plus ~8 MB of
    temporaries, not 640 MB of int64 copies."""
    values = np.asarray(image)
    out = np.empty(values.shape, dtype=np.uint8)
    rows = max(1, _SCALE_ROWS_PIXELS // max(1, values.shape[1]))
    for top in range(0, values.shape[0], rows):
        band = values[top : top + rows]
        if band.dtype.kind == "i":
            band = np.clip(band, 0, 65535)
        band = np.minimum(band.astype(np.uint32), 65535)
        out[top : top + rows] = (band * 255 + 32767) // 65535
    return Image.fromarray(out, "L")


def _scale_float(image: Image.Image) -> Image.Image:
    """Float grey -> 8-bit: data within [0, 1] is scaled by 255, anything else clipped to [0, 255]."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _to_rgb(image: Image.Image, alpha_background: tuple[int, int, int] | None) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        return _scale_high_depth(image).convert("RGB")
    if image.mode == "F":
        return _scale_float(image).convert("RGB")
    has_alpha = image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)
    if has_alpha and alpha_background is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*alpha_background, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("P", "L", "1"):
        image.info.pop("transparency", None)  # the reference ignores it; dropping it avoids PIL's warning
    return image.convert("RGB")


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode untrusted bytes to an RGB image (first frame, EXIF orientation applied if enabled)."""
    _check_bytes(data, limits)
    image = _open_header(data, limits)
    try:
        orientation = _header_orientation(image) if limits.apply_exif_orientation else 1
        image.load()
        rgb = _to_rgb(image, limits.alpha_background)
        if orientation in _ORIENTATION_FIX:
            rgb = rgb.transpose(_ORIENTATION_FIX[orientation])
    except ServingError:
        image.close()
        raise
    except Image.DecompressionBombError as error:
        image.close()
        raise _bomb(error, limits) from error
    except MemoryError:  # the sandbox's memory limit: its worker reports it as such
        image.close()
        raise
    except Exception as error:  # truncated data, corrupt streams, unsupported modes, ...
        image.close()
        raise _undecodable(f"{image.format} data is invalid ({error})") from error
    if rgb.size[0] * rgb.size[1] > limits.max_pixels:
        raise _too_many_pixels(rgb.size[0], rgb.size[1], limits)
    return rgb
