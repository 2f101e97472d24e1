"""Banded resizes and banded tiling are bit for bit one Pillow resize / the serial tiling.

Random-noise images (every pixel different: any coefficient that differed would show), sizes from 1 pixel to
a few thousand, up- and downscaling, equal sides, ratios near and far from the grid, every pixel mode the bands
take (and the ones that fall back), many band cuts; then tile_pixels with threads against the serial path and
the reference-style implementation, every dtype, with and without the thumbnail.
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ivl_vision.banded_resize import BandPlan, bandable, banded_resize, column_bands, start_rows
from ivl_vision.tiling import TilingConfig, plan_tiles, tile_pixels
from PIL import Image
from reference_tiling import reference_pixels


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(max_workers=3) as executor:
        yield executor


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
    if mode == "I":
        return Image.fromarray(rng.integers(-(2**20), 2**20, (height, width), dtype=np.int32), "I")
    if mode == "F":
        return Image.fromarray(rng.normal(0, 100, (height, width)).astype(np.float32), "F")
    raise ValueError(mode)


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


CASES = [
    ((3840, 2160), (1792, 896)),  # a 4K photo to its max_tiles 12 grid
    ((3840, 2160), (448, 448)),  # ... and its thumbnail
    ((1280, 720), (1792, 896)),  # upscaled grid
    ((1700, 8000), (448, 2688)),  # a tall scan: 1 column
    ((286, 1560), (448, 2688)),
    ((1, 1), (448, 448)),
    ((1, 900), (448, 448)),
    ((900, 1), (448, 448)),
    ((448, 448), (448, 448)),  # no resize at all
    ((1000, 448), (896, 448)),  # horizontal pass only
    ((448, 1000), (448, 896)),  # vertical pass only
    ((2161, 1217), (1344, 896)),  # coprime sides: no band boundary falls on a source pixel edge
    ((5, 7), (3, 11)),
]


@pytest.mark.parametrize(("source", "target"), CASES)
def test_banded_resize_equals_one_resize_rgb(pool, source, target):
    image = noise(*source, seed=sum(source))
    expected = image.resize(target, Image.Resampling.BICUBIC)
    for plan, pieces in ((BandPlan(row_bands=3), 3), (BandPlan(row_bands=1, max_band_bytes=4096), 5),
                         (BandPlan(row_bands=7), 1)):
        assert same(banded_resize(image, target, pool, plan, pieces), expected), (source, target, plan, pieces)


@pytest.mark.parametrize("mode", ["L", "I", "F", "RGBA"])
@pytest.mark.parametrize(("source", "target"), [((1023, 641), (896, 448)), ((300, 1200), (448, 1344)),
                                                ((640, 480), (448, 448))])
def test_banded_resize_equals_one_resize_other_modes(pool, mode, source, target):
    """L / I / F run in bands; RGBA (premultiplied around Pillow's resize) falls back to one call."""
    image = noise(*source, mode=mode, seed=7)
    expected = image.resize(target, Image.Resampling.BICUBIC)
    assert same(banded_resize(image, target, pool, BandPlan(row_bands=5), 3), expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 400), height=st.integers(1, 400), out_w=st.integers(1, 500), out_h=st.integers(1, 500),
       bands=st.integers(1, 9), pieces=st.integers(1, 6))
def test_banded_resize_property(pool, width, height, out_w, out_h, bands, pieces):
    image = noise(width, height, seed=width * 1000 + height)
    assert same(banded_resize(image, (out_w, out_h), pool, BandPlan(row_bands=bands), pieces),
                image.resize((out_w, out_h), Image.Resampling.BICUBIC))


@pytest.mark.parametrize(("source", "target"), [((2, 266), (1, 1)), ((3, 301), (224, 224)), ((5, 700), (224, 224)),
                                                ((2, 600), (30, 3))])
def test_pillows_vertical_first_sizes_take_one_call(pool, source, target):
    """Pillow >= 10 resizes a source over 100 times taller than wide (height shrinking) vertical pass first,
    which the bands do not follow: those sizes are not bandable and come out of one plain call."""
    assert not bandable(source, target)
    image = noise(*source, seed=source[1])
    assert same(banded_resize(image, target, pool, BandPlan(row_bands=3), 2),
                image.resize(target, Image.Resampling.BICUBIC))
    with pytest.raises(ValueError, match="vertical pass first"):
        start_rows(image, [target], pool, BandPlan())
    assert bandable((3, 300), (224, 224)) and bandable((2, 300), (224, 400))  # the edges of Pillow's rule


def test_column_bands_cover_the_width_at_tile_edges():
    assert column_bands(1792, 4, align=448) == [(0, 448), (448, 896), (896, 1344), (1344, 1792)]
    assert column_bands(1792, 2, align=448) == [(0, 896), (896, 1792)]
    assert column_bands(448, 2, align=448) == [(0, 224), (224, 448)]  # fewer tiles than pieces: cut inside
    for width, pieces in ((1, 3), (7, 3), (1000, 6)):
        bands = column_bands(width, pieces)
        assert bands[0][0] == 0 and bands[-1][1] == width
        assert all(a[1] == b[0] for a, b in itertools.pairwise(bands))


def test_row_bands_respect_the_byte_cap():
    image = Image.new("RGB", (3840, 2160))
    rows = BandPlan(row_bands=2, max_band_bytes=1 << 20).rows(image)
    assert rows[0][0] == 0 and rows[-1][1] == 2160
    assert max(bottom - top for top, bottom in rows) * 3840 * 4 <= 1 << 20


TILING_CASES = [
    ((3840, 2160), TilingConfig(max_tiles=12)),  # 4x2 + thumbnail
    ((3840, 2160), TilingConfig(max_tiles=40)),
    ((1280, 720), TilingConfig(max_tiles=12)),
    ((1700, 8000), TilingConfig(max_tiles=12)),  # 1 column: column bands cut inside tiles
    ((286, 1560), TilingConfig(max_tiles=6)),
    ((640, 480), TilingConfig(max_tiles=1)),  # one tile, no thumbnail
    ((640, 480), TilingConfig(max_tiles=6, use_thumbnail=False)),
    ((997, 331), TilingConfig(min_tiles=4, max_tiles=9)),
    ((448, 448), TilingConfig(max_tiles=12)),
    ((1000, 700), TilingConfig(image_size=224, max_tiles=8)),
    ((60, 6100), TilingConfig(max_tiles=12)),  # over 100x taller than wide: Pillow resizes vertical pass first
]


@pytest.mark.parametrize(("size", "config"), TILING_CASES)
@pytest.mark.parametrize("threads", [2, 3])
def test_tile_pixels_in_bands_equals_serial_and_reference(pool, size, config, threads):
    image = noise(*size, seed=size[0])
    plan = plan_tiles(*size, config)
    serial = tile_pixels(image, plan, config)
    banded = tile_pixels(image, plan, config, executor=pool, threads=threads)
    assert banded.shape == serial.shape
    assert np.array_equal(banded, serial)
    reference = reference_pixels(image, config.min_tiles, config.max_tiles, config.image_size,
                                 config.use_thumbnail).numpy()
    assert np.array_equal(banded, reference)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tile_pixels_in_bands_every_dtype(pool, dtype):
    image = noise(2000, 1100, seed=3)
    config = TilingConfig(max_tiles=12)
    plan = plan_tiles(*image.size, config)
    out = np.empty((plan.num_tiles, 3, 448, 448), dtype=np.uint16 if dtype == "bfloat16" else np.float16)
    banded = tile_pixels(image, plan, config, dtype, out=out, executor=pool, threads=3)
    assert banded is out
    assert np.array_equal(banded, tile_pixels(image, plan, config, dtype))
