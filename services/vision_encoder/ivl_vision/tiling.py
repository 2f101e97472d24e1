"""InternVL dynamic high-resolution tiling, bit-exact with the reference `dynamic_preprocess`.

Pure Python + numpy + PIL (no torch). `plan_tiles` picks the grid from the image size alone, so a
client can learn the tile count from an image header; `tile_pixels` turns an RGB image into the
normalised (num_tiles, 3, S, S) array the vision tower takes. See docs/tiling.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import numpy as np
from ivl_proto.dtypes import float32_to_bfloat16_bits, numpy_dtype
from ivl_proto.errors import invalid
from ivl_proto.tiling_limits import check_tile_counts
from PIL import Image

from ivl_vision.banded_resize import BandPlan, bandable, column_bands, finish_columns, start_rows
from ivl_vision.exact_resize import ExactResize, exact_resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TilingConfig:
    """Tile budget of one image; validated on construction (ServingError INVALID_ARGUMENT)."""

    image_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.image_size <= 4096:
            raise invalid(f"image_size is {self.image_size}; it must be between 1 and 4096")
        check_tile_counts(self.max_tiles, self.min_tiles)

    def with_overrides(
        self, max_tiles: int | None, min_tiles: int | None, use_thumbnail: bool | None
    ) -> TilingConfig:
        """A copy with the given fields replaced; None keeps the current value."""
        return replace(
            self,
            max_tiles=self.max_tiles if max_tiles is None else max_tiles,
            min_tiles=self.min_tiles if min_tiles is None else min_tiles,
            use_thumbnail=self.use_thumbnail if use_thumbnail is None else use_thumbnail,
        )


@dataclass(frozen=True)
class TilePlan:
    """The chosen grid: cols x rows tiles of the resized image, plus the thumbnail if any."""

    grid_cols: int
    grid_rows: int
    num_tiles: int  # grid tiles + thumbnail
    resize_width: int
    resize_height: int
    has_thumbnail: bool
    original_width: int
    original_height: int

    @property
    def grid_tiles(self) -> int:
        return self.grid_cols * self.grid_rows

    def to_json_dict(self) -> dict:
        return {
            "grid": [self.grid_cols, self.grid_rows],
            "num_tiles": self.num_tiles,
            "resize": [self.resize_width, self.resize_height],
        }


@functools.lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """(cols, rows) candidates in the reference's order.

    The reference builds a Python set with this very comprehension and sorts it by cols*rows with
    the stable `sorted`, so grids of equal area keep the set's iteration order. That order decides
    ties between equal-area grids (e.g. min=max=4, a 5x2 image), so we build the set the same way.
    Int-tuple hashes are not randomised, so the order is deterministic for a given CPython.
    """
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def _closest_grid(width: int, height: int, config: TilingConfig) -> tuple[int, int]:
    aspect = width / height  # Python floats (float64), as the reference: some ties hinge on rounding
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(config.min_tiles, config.max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * config.image_size * config.image_size * cols * rows:
            best = (cols, rows)
    return best


def plan_tiles(width: int, height: int, config: TilingConfig) -> TilePlan:
    """The reference's grid choice for a width x height image (after EXIF orientation)."""
    if width < 1 or height < 1:
        raise invalid(f"image is {width}x{height}; both sides must be at least 1 pixel")
    cols, rows = _closest_grid(width, height, config)
    has_thumbnail = config.use_thumbnail and cols * rows != 1
    return TilePlan(
        grid_cols=cols,
        grid_rows=rows,
        num_tiles=cols * rows + int(has_thumbnail),
        resize_width=config.image_size * cols,
        resize_height=config.image_size * rows,
        has_thumbnail=has_thumbnail,
        original_width=width,
        original_height=height,
    )


def _float32_lut() -> np.ndarray:
    """(3, 256) float32: ((v / 255) - mean) / std with float32 ops, as ToTensor + Normalize do."""
    values = np.arange(256, dtype=np.float32) / np.float32(255)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None]
    return (values[None, :] - mean) / std


_LUT_FLOAT32 = _float32_lut()
RAW = "uint8"  # the pixel format of tiles not yet normalised: the resized RGB values themselves
_LUTS: dict[str, np.ndarray] = {
    "float32": _LUT_FLOAT32,
    "float16": _LUT_FLOAT32.astype(np.float16),
    "bfloat16": float32_to_bfloat16_bits(_LUT_FLOAT32),
    RAW: np.tile(np.arange(256, dtype=np.uint8), (3, 1)),  # the identity table
}


def _gather(table: np.ndarray, block: np.ndarray, out: np.ndarray) -> None:
    """out = table[block]; for RAW (the identity table) a plain copy, several times faster than the gather."""
    if table.dtype == np.uint8:
        np.copyto(out, block)
    else:
        np.take(table, block, out=out, mode="clip")


def pixel_storage(dtype: str) -> np.dtype:
    """The numpy storage of tiles in `dtype`: a wire dtype (float32, float16, bfloat16 as uint16) or RAW."""
    return np.dtype(np.uint8) if dtype == RAW else numpy_dtype(dtype, "the pixels")


def normalise_tiles(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """RAW tiles (N, 3, S, S) -> normalised tiles in `dtype`, through the same 256-entry table as tile_pixels, so
    normalise_tiles(tile_pixels(..., RAW), dtype) is bit-identical to tile_pixels(..., dtype). A quarter of the
    bytes cross from a decode worker as RAW (uint8) tiles; this gather is then the service's only pass over them."""
    if raw.dtype != np.uint8 or raw.ndim != 4 or raw.shape[1] != 3:
        raise invalid(f"normalise_tiles needs (N, 3, S, S) uint8 tiles, got {raw.dtype} {raw.shape}")
    if dtype == RAW:
        raise invalid("normalise_tiles needs a wire dtype (float32, float16, bfloat16), not the raw format")
    lut = _LUTS[dtype]
    if out is None:
        out = np.empty(raw.shape, dtype=lut.dtype)
    elif out.shape != raw.shape or out.dtype != lut.dtype:
        raise invalid(f"out must be a {lut.dtype} array of shape {raw.shape}, got {out.dtype} {out.shape}")
    for tile in range(raw.shape[0]):
        for channel in range(3):
            _gather(lut[channel], raw[tile, channel], out[tile, channel])
    return out


def _normalise_into(planes: list[np.ndarray], lut: np.ndarray, out: np.ndarray) -> None:
    """out[t, c] = lut[c][tile t of plane c] for square tiles laid out row-major on the planes.

    One np.take per tile and channel: contiguous 2-D index and output blocks gather fastest.
    """
    tiles_per_row = planes[0].shape[1] // out.shape[-1]
    size = out.shape[-1]
    for channel, plane in enumerate(planes):
        table = lut[channel]
        for tile in range(out.shape[0]):
            top, left = (tile // tiles_per_row) * size, (tile % tiles_per_row) * size
            block = plane[top : top + size, left : left + size]
            _gather(table, block, out[tile, channel])


def _normalise_columns(
    planes: list[np.ndarray], lut: np.ndarray, out: np.ndarray, left: int, grid_cols: int
) -> None:
    """Like _normalise_into for a band of output columns [left, left + band width) of the grid: each tile
    row's part of the band goes to its tiles (whole tiles, or the part of a tile the band covers)."""
    size = out.shape[-1]
    right = left + planes[0].shape[1]
    for column in range(left // size, (right - 1) // size + 1):
        start, stop = max(left, column * size), min(right, (column + 1) * size)
        for row in range(out.shape[0] // grid_cols):
            tile = row * grid_cols + column
            for channel, plane in enumerate(planes):
                block = plane[row * size : (row + 1) * size, start - left : stop - left]
                _gather(lut[channel], block, out[tile, channel, :, start - column * size : stop - column * size])


def _channel_planes(image: Image.Image) -> list[np.ndarray]:
    return [np.asarray(band) for band in image.split()]


def _tile_in_bands(
    image: Image.Image, plan: TilePlan, size: int, lut: np.ndarray, out: np.ndarray, executor: Executor,
    threads: int,
) -> None:
    """tile_pixels' resizes and gathers as bands on `executor` (ivl_vision.banded_resize): the horizontal passes
    of the grid and the thumbnail band by band over the source rows, then the vertical passes by column bands
    (a tile column each where the grid has enough), each band normalised into its tiles in the same thread."""
    sizes = [(plan.resize_width, plan.resize_height)] + ([(size, size)] if plan.has_thumbnail else [])
    stage = start_rows(image, sizes, executor, BandPlan.for_threads(threads))
    grid = out[: plan.grid_tiles]

    def gather_grid(left: int, band: Image.Image) -> None:
        _normalise_columns(_channel_planes(band), lut, grid, left, plan.grid_cols)

    def gather_thumbnail(left: int, band: Image.Image) -> None:
        _normalise_into(_channel_planes(band), lut, out[plan.grid_tiles :])

    pieces = column_bands(plan.resize_width, max(threads, plan.grid_cols), align=size)
    futures = finish_columns(stage, 0, pieces, executor, then=gather_grid)
    if plan.has_thumbnail:
        futures += finish_columns(stage, 1, [(0, size)], executor, then=gather_thumbnail)
    for future in futures:
        future.result()


def _run(executor: Executor | None, tasks: list[Callable[[], None]]) -> None:
    """Run `tasks` on `executor` and wait for all of them (inline, in order, without one)."""
    if executor is None:
        for task in tasks:
            task()
        return
    for future in [executor.submit(task) for task in tasks]:
        future.result()


def _tile_with_kernel(
    pixels: np.ndarray, plan: TilePlan, size: int, lut: np.ndarray, out: np.ndarray, resizer: ExactResize,
    executor: Executor | None, threads: int,
) -> None:
    """tile_pixels' resizes by the exact kernel (ivl_vision.exact_resize) on the (H, W, 3) pixels: the horizontal
    passes of the grid and the thumbnail by bands of source rows, then the vertical passes by column bands (a tile
    column each where the grid has enough), each band normalised into its tiles in the same thread. Serial without
    an executor."""
    height, width = pixels.shape[:2]
    sizes = [(plan.resize_width, plan.resize_height)] + ([(size, size)] if plan.has_thumbnail else [])
    middles = [pixels if w == width else np.empty((height, w, 3), np.uint8) for w, _ in sizes]
    pieces = 1 if executor is None else max(1, threads)

    def widen(rows: tuple[int, int]) -> None:
        for middle in middles:
            if middle is not pixels:
                resizer.horizontal(pixels, rows, middle)

    _run(executor, [functools.partial(widen, rows) for rows in column_bands(height, 2 * pieces if pieces > 1 else 1)])
    grid_planes = np.empty((3, plan.resize_height, plan.resize_width), np.uint8)
    grid = out[: plan.grid_tiles]

    def finish_grid(columns: tuple[int, int]) -> None:
        resizer.vertical(middles[0], columns, grid_planes)
        left, right = columns
        _normalise_columns([plane[:, left:right] for plane in grid_planes], lut, grid, left, plan.grid_cols)

    tasks: list[Callable[[], None]] = [
        functools.partial(finish_grid, columns)
        for columns in column_bands(plan.resize_width, max(pieces, plan.grid_cols) if pieces > 1 else 1, align=size)
    ]
    if plan.has_thumbnail:

        def finish_thumbnail() -> None:
            thumbnail_planes = np.empty((3, size, size), np.uint8)
            resizer.vertical(middles[1], (0, size), thumbnail_planes)
            _normalise_into(list(thumbnail_planes), lut, out[plan.grid_tiles :])

        tasks.append(finish_thumbnail)
    _run(executor, tasks)


def tile_pixels(
    image: Image.Image,
    plan: TilePlan,
    config: TilingConfig,
    dtype: str = "float32",
    out: np.ndarray | None = None,
    executor: Executor | None = None,
    threads: int = 1,
    kernel: bool = True,
) -> np.ndarray:
    """Normalised tiles (num_tiles, 3, S, S): grid tiles row-major, then the thumbnail.

    One BICUBIC resize of the whole image to the grid, one vectorised gather per channel through a
    256-entry table (bit-identical to ToTensor + Normalize in float32); float16 / bfloat16 are the
    float32 values rounded to nearest even (bfloat16 as uint16 bit patterns); RAW ("uint8") keeps the resized
    RGB values, for normalise_tiles to finish. With an `executor` and threads > 1 the resizes and gathers run in
    bands on its threads, with the same pixels. The resizes are the exact kernel's (ivl_vision.exact_resize) where
    it is built and `kernel` is true, Pillow's own otherwise: the same pixels either way.
    """
    if image.mode != "RGB":
        raise invalid(f"tile_pixels needs an RGB image, got mode {image.mode}")
    if image.size != (plan.original_width, plan.original_height):
        raise invalid(
            f"image is {image.width}x{image.height} but the plan was made for "
            f"{plan.original_width}x{plan.original_height}"
        )
    pixel_storage(dtype)  # validates the name
    lut = _LUTS[dtype]
    size = config.image_size
    shape = (plan.num_tiles, 3, size, size)
    if out is None:
        out = np.empty(shape, dtype=lut.dtype)
    elif out.shape != shape or out.dtype != lut.dtype or not out.flags.c_contiguous:
        raise invalid(
            f"out must be a C-contiguous {lut.dtype} array of shape {shape}, got {out.dtype} {out.shape}"
        )
    targets = [(plan.resize_width, plan.resize_height)] + ([(size, size)] if plan.has_thumbnail else [])
    in_order = all(bandable(image.size, target) for target in targets)
    resizer = exact_resize() if kernel and in_order else None
    parallel = executor is not None and threads > 1
    if resizer is not None:
        _tile_with_kernel(np.asarray(image), plan, size, lut, out, resizer, executor if parallel else None, threads)
        return out
    if parallel and in_order:
        assert executor is not None
        _tile_in_bands(image, plan, size, lut, out, executor, threads)
        return out
    resized = image.resize((plan.resize_width, plan.resize_height), Image.Resampling.BICUBIC)
    _normalise_into(_channel_planes(resized), lut, out[: plan.grid_tiles])
    if plan.has_thumbnail:
        thumbnail = image.resize((size, size), Image.Resampling.BICUBIC)
        _normalise_into(_channel_planes(thumbnail), lut, out[plan.grid_tiles :])
    return out
