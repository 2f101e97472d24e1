"""Pillow's resize split into bands that run on threads, bit for bit equal to one `Image.resize` call.

Pillow resizes in two separable passes, horizontal first, then vertical, and computes each pass's filter
coefficients from (source length, box, output length) alone:
- the horizontal pass makes every output row from ONE source row, so a band of source rows cropped out and
  resized to (new width, same height) runs the horizontal pass only, with the same coefficients (same source
  width, same output width, no box): its rows are exactly those rows of the full resize's intermediate;
- the vertical pass makes every output column from ONE column of that intermediate, so a band of its columns
  cropped out and resized to (same width, new height) runs the vertical pass only, again with the full
  resize's coefficients (same source height, same output height).
Each output value is then the same fixed-point (8-bit modes) or double (32-bit modes) sum over the same
inputs with the same coefficients as in one call: equal by construction, and tests/vision/test_banded_resize.py
checks it across sizes, ratios and modes. Both passes release the GIL, so the bands run in parallel.

Pillow's `Image.resize` itself takes the other order for very tall images: when the source is more than 100
times taller than wide and the height shrinks it runs the vertical pass first (two calls, Pillow >= 10). Those
sizes are not `bandable()`: they take one plain call (`banded_resize`), and `tile_pixels` resizes them
unbanded, so the pixels stay Pillow's own.

Not used: `resize(box=...)` on bands of OUTPUT rows. The box is a float32 and moves the filter centres,
which changes coefficients in their last bits and so, now and then, a pixel by one.

    with ThreadPoolExecutor(4) as pool:
        plan = BandPlan.for_threads(4)
        stage = start_rows(image, [(1792, 896), (448, 448)], pool, plan)      # horizontal passes, all targets
        grid_columns = finish_columns(stage, 0, [(0, 896), (896, 1792)], pool)  # futures of (left, band image)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

from PIL import Image

RESAMPLE = Image.Resampling.BICUBIC
# Modes whose resize is the plain two-pass filter. Pillow premultiplies RGBA / LA around a resize (a band
# pass would round the premultiplied values in between) and resizes "1" / "P" with NEAREST: those take
# one plain call.
BANDED_MODES = frozenset({"L", "RGB", "I", "F"})
# A source band cropped for the horizontal passes holds at most this many bytes (RGB is stored 4 bytes per
# pixel): bands are many and small enough that the copies never weigh on a decode worker's address space.
MAX_BAND_BYTES = 8 << 20


def bandable(source: tuple[int, int], size: tuple[int, int]) -> bool:
    """Pillow resizes `source` (width, height) to `size` horizontal pass first, the order the bands follow
    (not so for a source over 100 times taller than wide whose height shrinks: see the module docstring)."""
    return not (source[1] > source[0] * 100 and size[1] < source[1])


@dataclass(frozen=True)
class BandPlan:
    """How finely to cut: at least `row_bands` source-row bands, each at most `max_band_bytes`."""

    row_bands: int = 4
    max_band_bytes: int = MAX_BAND_BYTES

    @classmethod
    def for_threads(cls, threads: int) -> BandPlan:
        return cls(row_bands=max(1, 2 * threads))

    def rows(self, image: Image.Image) -> list[tuple[int, int]]:
        """(top, bottom) source-row bands covering the image."""
        row_bytes = max(1, image.width * 4)
        count = max(self.row_bands, math.ceil(image.height * row_bytes / self.max_band_bytes))
        count = max(1, min(count, image.height))
        step = math.ceil(image.height / count)
        return [(top, min(top + step, image.height)) for top in range(0, image.height, step)]


@dataclass
class RowStage:
    """The horizontal passes of several target sizes, under way: one intermediate per target (or the
    source itself where a target keeps the source width)."""

    source: Image.Image
    sizes: list[tuple[int, int]]
    intermediates: list[Image.Image]
    futures: list[Future[None]]

    def wait(self) -> None:
        for future in self.futures:
            future.result()


def _horizontal(source: Image.Image, band: tuple[int, int], targets: list[tuple[int, Image.Image]]) -> None:
    top, bottom = band
    rows = source.crop((0, top, source.width, bottom))
    for width, intermediate in targets:
        intermediate.paste(rows.resize((width, bottom - top), RESAMPLE), (0, top))


def start_rows(
    source: Image.Image, sizes: Sequence[tuple[int, int]], executor: Executor, plan: BandPlan
) -> RowStage:
    """Submit the horizontal pass of every target size, band by band: one crop of each source band feeds the
    horizontal pass of all targets (the grid and the thumbnail read the same rows)."""
    if source.mode not in BANDED_MODES:
        raise ValueError(f"banded resizes need one of the modes {sorted(BANDED_MODES)}, not {source.mode}")
    for size in sizes:
        if not bandable(source.size, size):
            raise ValueError(f"Pillow resizes {source.width}x{source.height} to {size[0]}x{size[1]} vertical pass "
                             "first: resize it in one call")
    source.load()
    targets = [(i, width) for i, (width, _) in enumerate(sizes) if width != source.width]
    intermediates = [source] * len(sizes)
    for i, width in targets:
        intermediates[i] = Image.new(source.mode, (width, source.height))
    futures: list[Future[None]] = []
    if targets:
        work = [(width, intermediates[i]) for i, width in targets]
        futures = [executor.submit(_horizontal, source, band, work) for band in plan.rows(source)]
    return RowStage(source, list(sizes), intermediates, futures)


def _vertical(intermediate: Image.Image, left: int, right: int, height: int) -> Image.Image:
    columns = intermediate if (left, right) == (0, intermediate.width) else intermediate.crop(
        (left, 0, right, intermediate.height))
    return columns if height == intermediate.height else columns.resize((right - left, height), RESAMPLE)


def finish_columns(
    stage: RowStage,
    target: int,
    columns: Sequence[tuple[int, int]],
    executor: Executor,
    then: Callable[[int, Image.Image], object] | None = None,
) -> list[Future[object]]:
    """Wait for the horizontal passes, then submit the vertical pass of target `target` on each
    (left, right) column band of its output; each future's result is `then(left, band image)` (the band
    image itself when `then` is None), computed in the worker thread."""
    stage.wait()
    width, height = stage.sizes[target]
    intermediate = stage.intermediates[target]
    if intermediate.width != width:
        raise ValueError(f"the intermediate is {intermediate.width} wide for a target {width} wide")

    def one(left: int, right: int) -> object:
        band = _vertical(intermediate, left, right, height)
        return band if then is None else then(left, band)

    return [executor.submit(one, left, right) for left, right in columns]


def column_bands(width: int, pieces: int, align: int = 1) -> list[tuple[int, int]]:
    """About `pieces` (left, right) bands covering [0, width), cut at multiples of `align` where possible."""
    pieces = max(1, min(pieces, width))
    units = width // align if align > 1 and width % align == 0 and width // align >= pieces else 0
    if units:
        per = math.ceil(units / pieces)
        return [(u * align, min(u + per, units) * align) for u in range(0, units, per)]
    step = math.ceil(width / pieces)
    return [(left, min(left + step, width)) for left in range(0, width, step)]


def banded_resize(image: Image.Image, size: tuple[int, int], executor: Executor, plan: BandPlan | None = None,
                  pieces: int = 4) -> Image.Image:
    """`image.resize(size, BICUBIC)`, computed in bands on `executor`; the same pixels (one plain call for
    modes outside BANDED_MODES and sizes that are not `bandable`)."""
    if image.mode not in BANDED_MODES or not bandable(image.size, size):
        return image.resize(size, RESAMPLE)
    stage = start_rows(image, [size], executor, plan or BandPlan())
    out = Image.new(image.mode, size)
    bands = finish_columns(stage, 0, column_bands(size[0], pieces), executor, then=lambda left, band: (left, band))
    for future in bands:
        left, piece = future.result()  # type: ignore[misc]
        out.paste(piece, (left, 0))
    return out
