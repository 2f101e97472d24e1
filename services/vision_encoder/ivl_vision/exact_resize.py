"""Pillow's BICUBIC resize of 8-bit images, the same bytes, from the vectorised C kernel `ivl_vision._exact_resize`.

Tiling resizes every image twice (the grid and the thumbnail), and Pillow's resize was most of a 4K image's
preprocessing. The kernel (`_exact_resize.c`) computes the filter coefficients exactly as Pillow does and the same
fixed-point sums over the same pixels, but it sums 16 RGB rows at a time in the horizontal pass and a whole row at a
time in the vertical one, in loops the compiler turns into AVX2; integer sums do not depend on their order, so the
bytes are Pillow's. It writes the vertical pass planar, (channels, height, width): the layout tiles are gathered from.

Two passes, as Pillow runs them (horizontal first, see `banded_resize.bandable` for the one order it does not take):
- `horizontal(src, rows, dst)`: rows [top, bottom) of src resized to dst's width; bands of rows run on threads;
- `vertical(src, columns, dst)`: columns [left, right) of that intermediate resized to dst's height, planar.
Both release the GIL.

`exact_resize()` gives the kernel only where it was built (the package's optional C extension: an install without a
C compiler skips it) and where it reproduces this Pillow's bytes on a self-check at first use; otherwise None, and
tiling takes Pillow's own resize (the same pixels, slower). tests/vision/test_exact_resize.py compares it with
`Image.resize` across sizes, ratios, band cuts and channel counts.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from PIL import Image

from ivl_vision.banded_resize import bandable

LOG = logging.getLogger(__name__)
# (source, target) sizes of the self-check: up and down, one axis kept, odd ratios, a single pixel.
SELF_CHECK_SIZES = (
    ((97, 61), (448, 448)),
    ((61, 97), (13, 200)),
    ((300, 7), (1, 1)),
    ((640, 480), (1344, 896)),
    ((1, 5), (448, 9)),
    ((123, 45), (123, 90)),
)


def _interleaved(array: np.ndarray, name: str) -> tuple[int, int, int]:
    """(height, width, channels) of a C-contiguous uint8 (height, width, channels) array, else ValueError."""
    if array.dtype != np.uint8 or array.ndim != 3 or not array.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous uint8 (height, width, channels) array, "
                         f"got {array.dtype} {array.shape}")
    return array.shape[0], array.shape[1], array.shape[2]


@dataclass(frozen=True)
class ExactResize:
    """The two passes of the kernel on numpy arrays, checked for shape and bounds before the C code runs."""

    kernel: ModuleType

    def horizontal(self, src: np.ndarray, rows: tuple[int, int], dst: np.ndarray) -> None:
        """dst[top:bottom] = rows [top, bottom) of src (H, W, C) resized to dst's width; dst is (H, W', C)."""
        height, width, channels = _interleaved(src, "src")
        if not (dst.flags.writeable and _interleaved(dst, "dst")[::2] == (height, channels)):
            raise ValueError(f"dst must be a writable ({height}, width, {channels}) array, got {dst.shape}")
        self.kernel.horizontal_pass(src, height, width, channels, rows[0], rows[1], dst.shape[1], dst)

    def vertical(self, src: np.ndarray, columns: tuple[int, int], dst: np.ndarray) -> None:
        """dst[:, :, left:right] = columns [left, right) of src (H, W, C) resized to dst's height, planar:
        dst is a C-contiguous uint8 (C, H', W)."""
        height, width, channels = _interleaved(src, "src")
        if (dst.dtype != np.uint8 or dst.ndim != 3 or not dst.flags.c_contiguous or not dst.flags.writeable
                or dst.shape[0] != channels or dst.shape[2] != width):
            raise ValueError(f"dst must be a writable C-contiguous uint8 ({channels}, height, {width}) array, "
                             f"got {dst.dtype} {dst.shape}")
        self.kernel.vertical_pass(src, height, width, channels, columns[0], columns[1], dst.shape[1], dst)

    def resize(self, src: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """The planes (C, height, width) of `Image.fromarray(src).resize(size, BICUBIC)`, for a (H, W, C) src."""
        height, width, channels = _interleaved(src, "src")
        if not bandable((width, height), size):
            raise ValueError(f"Pillow resizes {width}x{height} to {size[0]}x{size[1]} vertical pass first")
        middle = src if size[0] == width else np.empty((height, size[0], channels), np.uint8)
        if middle is not src:
            self.horizontal(src, (0, height), middle)
        planes = np.empty((channels, size[1], size[0]), np.uint8)
        self.vertical(middle, (0, size[0]), planes)
        return planes


def matches_pillow(resizer: ExactResize) -> bool:
    """Whether `resizer` gives Pillow's bytes on SELF_CHECK_SIZES (random RGB and L pixels)."""
    rng = np.random.default_rng(0)
    for (width, height), target in SELF_CHECK_SIZES:
        for channels in (3, 1):
            pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
            image = Image.fromarray(pixels if channels == 3 else pixels[:, :, 0])
            expected = np.asarray(image.resize(target, Image.Resampling.BICUBIC)).reshape(target[1], target[0], -1)
            if not np.array_equal(resizer.resize(pixels, target), expected.transpose(2, 0, 1)):
                return False
    return True


@functools.cache
def exact_resize() -> ExactResize | None:
    """The kernel where it is built and passes the self-check; None (Pillow's resize) otherwise. Decided once."""
    try:
        from ivl_vision import _exact_resize
    except ImportError as error:
        LOG.info("the exact resize kernel is not built (%s): tiling uses Pillow's resize, the same pixels, slower",
                 error)
        return None
    resizer = ExactResize(_exact_resize)
    if not matches_pillow(resizer):
        LOG.warning("the exact resize kernel differs from Pillow %s on its self-check: tiling uses Pillow's resize",
                    Image.__version__)
        return None
    return resizer
