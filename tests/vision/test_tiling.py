"""ivl_vision.tiling against the reference-style implementation (tests/vision/reference_tiling.py).

Geometry: a few hundred sizes x tile budgets, every exact halfway tie between candidate grids, the
documented float-rounding tie. Pixels: np.array_equal with the torch reference in float32; float16
and bfloat16 equal the float32 result cast by torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.tiling_limits import MAX_TILES_LIMIT
from ivl_vision.tiling import (
    RAW,
    TilingConfig,
    candidate_grids,
    normalise_tiles,
    plan_tiles,
    tile_pixels,
)
from PIL import Image
from reference_tiling import reference_closest_grid, reference_pixels, reference_target_grids


def _sizes() -> list[tuple[int, int]]:
    fixed = [
        (1, 1),
        (1, 20000),
        (20000, 1),
        (1, 2),
        (2, 1),
        (286, 1560),
        (1560, 286),
        (448, 448),
        (896, 448),
        (448, 896),
        (1920, 1080),
        (1080, 1920),
        (3840, 2160),
        (1700, 8000),
        (640, 480),
        (1000, 1000),
        (13, 7),
        (7, 13),
        (100, 3000),
        (3000, 100),
        (4096, 4096),
        (224, 224),
        (1344, 896),
        (2048, 1536),
        (1, 448),
        (448, 1),
        (5, 2),
        (17, 8),
        (12345, 678),
    ]
    rng = np.random.default_rng(7)
    random_sizes = [(int(w), int(h)) for w, h in rng.integers(1, 6000, size=(240, 2))]
    skinny = [
        (int(w), int(h)) for w, h in zip(rng.integers(1, 50, 30), rng.integers(1000, 30000, 30), strict=True)
    ]
    return fixed + random_sizes + skinny + [(h, w) for w, h in skinny]


SIZES = _sizes()
BUDGETS = [(1, n) for n in range(1, MAX_TILES_LIMIT + 1)] + [
    (2, 6),
    (3, 12),
    (4, 4),
    (6, 6),
    (5, 40),
    (12, 12),
]


def _assert_same_as_reference(
    width: int, height: int, config: TilingConfig, grids: list[tuple[int, int]] | None = None
) -> None:
    plan = plan_tiles(width, height, config)
    grids = grids or reference_target_grids(config.min_tiles, config.max_tiles)
    cols, rows = reference_closest_grid(
        width, height, config.min_tiles, config.max_tiles, config.image_size, grids
    )
    assert (plan.grid_cols, plan.grid_rows) == (cols, rows), (width, height, config)
    thumbnail = config.use_thumbnail and cols * rows != 1
    assert plan.has_thumbnail == thumbnail
    assert plan.num_tiles == cols * rows + int(thumbnail)
    assert (plan.resize_width, plan.resize_height) == (config.image_size * cols, config.image_size * rows)
    assert (plan.original_width, plan.original_height) == (width, height)


def test_candidate_order_is_the_reference_order() -> None:
    for min_tiles, max_tiles in BUDGETS:
        assert list(candidate_grids(min_tiles, max_tiles)) == reference_target_grids(min_tiles, max_tiles)


@pytest.mark.parametrize(("min_tiles", "max_tiles"), BUDGETS)
def test_grid_matches_reference_on_many_sizes(min_tiles: int, max_tiles: int) -> None:
    config = TilingConfig(min_tiles=min_tiles, max_tiles=max_tiles)
    grids = reference_target_grids(min_tiles, max_tiles)
    for width, height in SIZES:
        _assert_same_as_reference(width, height, config, grids)


@pytest.mark.parametrize("use_thumbnail", [True, False])
@pytest.mark.parametrize("image_size", [448, 224, 14])
def test_thumbnail_and_tile_size_options(use_thumbnail: bool, image_size: int) -> None:
    for max_tiles in (1, 6, 12, 40):
        config = TilingConfig(image_size=image_size, max_tiles=max_tiles, use_thumbnail=use_thumbnail)
        grids = reference_target_grids(1, max_tiles)
        for width, height in SIZES[:60]:
            _assert_same_as_reference(width, height, config, grids)


@pytest.mark.parametrize(
    ("min_tiles", "max_tiles"), [(1, 6), (1, 12), (1, 24), (1, 40), (4, 4), (6, 6), (2, 12), (8, 8)]
)
def test_every_exact_halfway_tie(min_tiles: int, max_tiles: int) -> None:
    """Sizes whose aspect ratio is exactly between two candidates, small and large (area rule)."""
    grids = reference_target_grids(min_tiles, max_tiles)
    config = TilingConfig(min_tiles=min_tiles, max_tiles=max_tiles)
    checked = 0
    for c1, r1 in grids:
        for c2, r2 in grids:
            if (c1, r1) >= (c2, r2):
                continue
            width, height = c1 * r2 + c2 * r1, 2 * r1 * r2  # width/height = mean of c1/r1 and c2/r2
            for scale in (1, 3, 40, 400):
                _assert_same_as_reference(width * scale, height * scale, config, grids)
                checked += 1
    assert checked >= 4 * len(grids) * (len(grids) - 1) // 2


def test_documented_float_rounding_tie() -> None:
    plan = plan_tiles(286, 1560, TilingConfig(max_tiles=6))
    assert plan.to_json_dict() == {"grid": [1, 6], "num_tiles": 7, "resize": [448, 2688]}


def test_equal_area_tie_follows_the_reference_set_order() -> None:
    # 5x2 (ratio 2.5) is exactly between (2, 2) and (4, 1); with min=max=4 the order of the two in
    # the reference's set decides; the area rule keeps the earlier one for a small image.
    small = plan_tiles(5, 2, TilingConfig(min_tiles=4, max_tiles=4))
    large = plan_tiles(5000, 2000, TilingConfig(min_tiles=4, max_tiles=4))
    assert (small.grid_cols, small.grid_rows) == reference_closest_grid(5, 2, 4, 4, 448)
    assert (large.grid_cols, large.grid_rows) == reference_closest_grid(5000, 2000, 4, 4, 448)
    assert {(small.grid_cols, small.grid_rows), (large.grid_cols, large.grid_rows)} == {(2, 2), (4, 1)}


def test_extremes() -> None:
    assert plan_tiles(1, 1, TilingConfig()).to_json_dict() == {
        "grid": [1, 1],
        "num_tiles": 1,
        "resize": [448, 448],
    }
    assert plan_tiles(1, 20000, TilingConfig()).to_json_dict()["grid"] == [1, 12]
    assert plan_tiles(20000, 1, TilingConfig(max_tiles=40)).to_json_dict()["grid"] == [40, 1]
    assert plan_tiles(1920, 1080, TilingConfig()).to_json_dict() == {
        "grid": [4, 2],
        "num_tiles": 9,
        "resize": [1792, 896],
    }
    no_thumb = plan_tiles(1920, 1080, TilingConfig(use_thumbnail=False))
    assert (no_thumb.num_tiles, no_thumb.has_thumbnail) == (8, False)
    with pytest.raises(ServingError, match="at least 1 pixel"):
        plan_tiles(0, 10, TilingConfig())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tiles": 0}, "max_tiles is 0; it must be between 1 and 40"),
        ({"max_tiles": 41}, "max_tiles is 41"),
        ({"min_tiles": 0}, "min_tiles is 0"),
        ({"min_tiles": 7, "max_tiles": 6}, "min_tiles is 7; it must be between 1 and max_tiles \\(6\\)"),
        ({"image_size": 0}, "image_size is 0"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ServingError, match=message) as caught:
        TilingConfig(**kwargs)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT


def test_with_overrides() -> None:
    base = TilingConfig(max_tiles=6)
    assert base.with_overrides(None, None, None) == base
    assert base.with_overrides(24, 2, False) == TilingConfig(min_tiles=2, max_tiles=24, use_thumbnail=False)
    with pytest.raises(ServingError, match="max_tiles is 99"):
        base.with_overrides(99, None, None)


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 7 % 256, y * 3 % 256, (x * y) % 256], axis=-1)
    return Image.fromarray(((base + rng.integers(0, 64, base.shape)) % 256).astype(np.uint8), "RGB")


PIXEL_CASES = [
    (640, 480, 1, 12, 448, True),
    (1920, 1080, 1, 6, 448, True),
    (286, 1560, 1, 6, 448, True),
    (1, 1, 1, 12, 448, True),
    (7, 900, 1, 24, 448, True),
    (1000, 700, 1, 12, 448, False),
    (300, 200, 4, 8, 224, True),
    (448, 448, 1, 12, 448, True),
]


@pytest.mark.parametrize(
    ("width", "height", "min_tiles", "max_tiles", "image_size", "thumbnail"), PIXEL_CASES
)
def test_pixels_equal_reference(
    width: int, height: int, min_tiles: int, max_tiles: int, image_size: int, thumbnail: bool
) -> None:
    image = _noise(width, height, seed=width + height)
    config = TilingConfig(
        image_size=image_size, min_tiles=min_tiles, max_tiles=max_tiles, use_thumbnail=thumbnail
    )
    plan = plan_tiles(width, height, config)
    ours = tile_pixels(image, plan, config)
    expected = reference_pixels(image, min_tiles, max_tiles, image_size, thumbnail).numpy()
    assert ours.dtype == np.float32
    assert ours.shape == expected.shape == (plan.num_tiles, 3, image_size, image_size)
    assert np.array_equal(ours, expected)
    as_half = tile_pixels(image, plan, config, "float16")
    assert np.array_equal(as_half, torch.from_numpy(ours).half().numpy())
    as_bf16 = tile_pixels(image, plan, config, "bfloat16")
    assert as_bf16.dtype == np.uint16
    torch_bits = torch.from_numpy(ours).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(as_bf16, torch_bits)


@pytest.mark.parametrize(("width", "height", "max_tiles"), [(1280, 720, 12), (300, 1500, 6), (448, 448, 12)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_raw_tiles_normalise_to_the_same_pixels(width: int, height: int, max_tiles: int, dtype: str) -> None:
    """What the decode workers now send (RAW uint8 tiles) and the service normalises equals tiling in `dtype`."""
    image = _noise(width, height, seed=width * height)
    config = TilingConfig(max_tiles=max_tiles)
    plan = plan_tiles(width, height, config)
    raw = tile_pixels(image, plan, config, RAW)
    assert raw.dtype == np.uint8 and raw.shape == (plan.num_tiles, 3, 448, 448)
    expected = tile_pixels(image, plan, config, dtype)
    assert np.array_equal(normalise_tiles(raw, dtype), expected)
    out = np.empty_like(expected)
    assert normalise_tiles(raw, dtype, out=out) is out and np.array_equal(out, expected)
    with pytest.raises(ServingError, match="uint8 tiles"):
        normalise_tiles(expected, dtype)
    with pytest.raises(ServingError, match="wire dtype"):
        normalise_tiles(raw, RAW)
    with pytest.raises(ServingError, match="out must be"):
        normalise_tiles(raw, dtype, out=np.empty((plan.num_tiles + 1, 3, 448, 448), expected.dtype))


def test_every_byte_value_normalises_like_torch() -> None:
    """A 448x448 image (no resize) holding all 256 values in each channel at once."""
    values = np.arange(448 * 448, dtype=np.int64).reshape(448, 448)
    pixels = np.stack([values % 256, (values * 7 + 3) % 256, (255 - values) % 256], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    config = TilingConfig()
    plan = plan_tiles(448, 448, config)
    assert np.array_equal(tile_pixels(image, plan, config), reference_pixels(image).numpy())


def test_out_array_is_filled_in_place_and_checked() -> None:
    image = _noise(900, 500, seed=1)
    config = TilingConfig(max_tiles=6)
    plan = plan_tiles(900, 500, config)
    out = np.full((plan.num_tiles, 3, 448, 448), np.nan, dtype=np.float32)
    result = tile_pixels(image, plan, config, out=out)
    assert result is out
    assert np.array_equal(out, reference_pixels(image, 1, 6).numpy())
    with pytest.raises(ServingError, match="out must be"):
        tile_pixels(image, plan, config, out=np.empty((1, 3, 448, 448), np.float32))
    with pytest.raises(ServingError, match="float16"):
        tile_pixels(image, plan, config, dtype="float64")


def test_wrong_image_for_plan_is_refused() -> None:
    config = TilingConfig()
    plan = plan_tiles(100, 100, config)
    with pytest.raises(ServingError, match="plan was made for 100x100"):
        tile_pixels(_noise(50, 100, 0), plan, config)
    with pytest.raises(ServingError, match="RGB"):
        tile_pixels(Image.new("L", (100, 100)), plan, config)
