"""The exact resize kernel (ivl_vision.exact_resize) gives Pillow's bytes, whole or in bands, and refuses bad input.

Random-noise images (every pixel different, so any coefficient or rounding that differed would show), sizes from 1
pixel to 4K, up- and downscaling, one axis kept, every channel count the kernel takes; then tiling with and without
the kernel against each other and the reference.
"""

from __future__ import annotations

import itertools
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from ivl_vision.banded_resize import bandable, column_bands
from ivl_vision.exact_resize import ExactResize, exact_resize, matches_pillow
from ivl_vision.tiling import RAW, TilingConfig, plan_tiles, tile_pixels
from PIL import Image
from reference_tiling import reference_pixels

BICUBIC = Image.Resampling.BICUBIC


@pytest.fixture(scope="module")
def resizer() -> ExactResize:
    kernel = exact_resize()
    assert kernel is not None, "ivl_vision._exact_resize is not built: run scripts/setup_env.sh (it needs gcc)"
    return kernel


def noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def pillow_planes(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pillow's resize as planes (C, h, w): RGB in one call, other channel counts one L image per channel."""
    if pixels.shape[2] == 3:
        return np.asarray(Image.fromarray(pixels).resize(size, BICUBIC)).transpose(2, 0, 1)
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(pixels[:, :, c])).resize(size, BICUBIC))
                     for c in range(pixels.shape[2])])


CASES = [
    ((3840, 2160), (1792, 896)),  # a 4K photo to its max_tiles 12 grid
    ((3840, 2160), (448, 448)),  # ... and its thumbnail
    ((3840, 2160), (1792, 1344)),
    ((1280, 720), (1792, 896)),  # upscaled
    ((1700, 8000), (448, 2688)),  # a tall scan
    ((1, 1), (448, 448)),
    ((900, 1), (448, 448)),
    ((448, 448), (448, 448)),  # no resize at all
    ((1000, 448), (896, 448)),  # horizontal pass only
    ((448, 1000), (448, 896)),  # vertical pass only
    ((5000, 3), (7, 2)),  # a strong shrink: wide filters
]


def test_the_kernel_is_built_and_passes_its_self_check(resizer):
    assert matches_pillow(resizer)


@pytest.mark.parametrize(("source", "target"), CASES)
def test_rgb_resize_equals_pillow(resizer, source, target):
    pixels = noise(*source, seed=source[0] + target[1])
    assert np.array_equal(resizer.resize(pixels, target), pillow_planes(pixels, target))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_every_channel_count_equals_pillow(resizer, channels):
    pixels = noise(301, 203, channels, seed=channels)
    for target in ((448, 448), (97, 1000), (301, 100), (20, 203)):
        assert np.array_equal(resizer.resize(pixels, target), pillow_planes(pixels, target)), (channels, target)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 300), height=st.integers(1, 300), out_w=st.integers(1, 400), out_h=st.integers(1, 400),
       channels=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_resize_property(resizer, width, height, out_w, out_h, channels, seed):
    assume(bandable((width, height), (out_w, out_h)))  # the other order is refused (test below)
    pixels = noise(width, height, channels, seed)
    assert np.array_equal(resizer.resize(pixels, (out_w, out_h)), pillow_planes(pixels, (out_w, out_h)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 500), height=st.integers(1, 500), out_w=st.integers(1, 500), out_h=st.integers(1, 500),
       row_pieces=st.integers(1, 9), column_pieces=st.integers(1, 9))
def test_bands_equal_one_resize(resizer, width, height, out_w, out_h, row_pieces, column_pieces):
    """Rows widened band by band and columns finished band by band give the one-call bytes (the threads' cuts)."""
    pixels = noise(width, height, seed=width * height)
    middle = np.empty((height, out_w, 3), np.uint8)
    for rows in column_bands(height, row_pieces):
        resizer.horizontal(pixels, rows, middle)
    planes = np.empty((3, out_h, out_w), np.uint8)
    for columns in column_bands(out_w, column_pieces):
        resizer.vertical(middle, columns, planes)
    if bandable((width, height), (out_w, out_h)):
        assert np.array_equal(planes, pillow_planes(pixels, (out_w, out_h)))


def test_tall_sources_pillow_resizes_vertical_first_are_refused(resizer):
    with pytest.raises(ValueError, match="vertical pass first"):
        resizer.resize(noise(3, 400), (224, 224))


def test_bad_arrays_get_clear_errors(resizer):
    pixels = noise(40, 30)
    middle = np.empty((30, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        resizer.horizontal(pixels.astype(np.int16), (0, 30), middle)
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        resizer.horizontal(pixels[:, ::2], (0, 30), middle)
    with pytest.raises(ValueError, match=r"dst must be a writable \(30, width, 3\)"):
        resizer.horizontal(pixels, (0, 30), np.empty((29, 20, 3), np.uint8))
    with pytest.raises(ValueError, match="sizes out of range"):
        resizer.horizontal(pixels, (10, 31), middle)
    with pytest.raises(ValueError, match="sizes out of range"):
        resizer.horizontal(pixels, (-1, 3), middle)
    with pytest.raises(ValueError, match=r"dst must be a writable C-contiguous uint8 \(3, height, 20\)"):
        resizer.vertical(middle, (0, 20), np.empty((3, 10, 21), np.uint8))
    with pytest.raises(ValueError, match="sizes out of range"):
        resizer.vertical(middle, (5, 21), np.empty((3, 10, 20), np.uint8))
    frozen = np.empty((30, 20, 3), np.uint8)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        resizer.horizontal(pixels, (0, 30), frozen)


def test_the_self_check_rejects_a_kernel_that_differs():
    def off_by_one(src, height, width, channels, col0, col1, out_height, dst):
        real.vertical_pass(src, height, width, channels, col0, col1, out_height, dst)
        view = np.frombuffer(dst, np.uint8)
        view[0] ^= 1  # one bit of one pixel

    real = exact_resize().kernel
    kernel = types.ModuleType("skewed")
    kernel.horizontal_pass = real.horizontal_pass
    kernel.vertical_pass = off_by_one
    assert not matches_pillow(ExactResize(kernel))


TILING_CASES = [
    ((3840, 2160), TilingConfig(max_tiles=12)),
    ((1280, 720), TilingConfig(max_tiles=40)),
    ((286, 1560), TilingConfig(max_tiles=6)),
    ((640, 480), TilingConfig(max_tiles=1)),
    ((997, 331), TilingConfig(min_tiles=4, max_tiles=9, use_thumbnail=False)),
    ((1000, 700), TilingConfig(image_size=224, max_tiles=8)),
    ((60, 6100), TilingConfig(max_tiles=12)),  # Pillow's vertical-first order: the kernel is not used
]


@pytest.mark.parametrize(("size", "config"), TILING_CASES)
def test_tiling_with_the_kernel_equals_pillow_tiling_and_the_reference(size, config):
    image = Image.fromarray(noise(*size, seed=size[1]))
    plan = plan_tiles(*size, config)
    with ThreadPoolExecutor(3) as pool:
        threaded = tile_pixels(image, plan, config, executor=pool, threads=3)
    serial = tile_pixels(image, plan, config)
    pillow = tile_pixels(image, plan, config, kernel=False)
    assert np.array_equal(serial, pillow) and np.array_equal(threaded, pillow)
    reference = reference_pixels(image, config.min_tiles, config.max_tiles, config.image_size,
                                 config.use_thumbnail).numpy()
    assert np.array_equal(serial, reference)
    for threads, dtype in itertools.product((1, 2), (RAW, "bfloat16")):
        with ThreadPoolExecutor(2) as pool:
            ours = tile_pixels(image, plan, config, dtype, executor=pool, threads=threads)
        assert np.array_equal(ours, tile_pixels(image, plan, config, dtype, kernel=False)), (threads, dtype)
