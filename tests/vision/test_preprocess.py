"""ivl_vision.preprocess: bytes -> tiles equal to the reference pipeline, sync and on the pool."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from ivl_proto.errors import ErrorCode, ServingError
from ivl_vision.image_io import ImageLimits
from ivl_vision.preprocess import PreprocessedImage, Preprocessor
from ivl_vision.tiling import TilingConfig
from PIL import Image
from reference_tiling import reference_pixels
from support.hostile_images import hostile_corpus


def _photo_bytes(width: int, height: int, fmt: str, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x % 256, y % 256, (x ^ y) % 256], axis=-1) + rng.integers(0, 30, (height, width, 3))
    image = Image.fromarray((pixels % 256).astype(np.uint8), "RGB").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def preprocessor() -> Iterator[Preprocessor]:
    with Preprocessor(ImageLimits(), dtype="float32", max_workers=2) as instance:
        yield instance


@pytest.mark.parametrize(
    ("width", "height", "fmt", "mode", "max_tiles"),
    [
        (800, 600, "JPEG", "RGB", 12),
        (1200, 300, "PNG", "RGB", 6),
        (300, 1400, "PNG", "P", 6),
        (500, 500, "PNG", "RGBA", 12),
        (640, 200, "GIF", "RGB", 4),
        (256, 512, "JPEG", "L", 12),
    ],
)
def test_preprocess_equals_reference_pipeline(
    preprocessor: Preprocessor, width: int, height: int, fmt: str, mode: str, max_tiles: int
) -> None:
    """The reference loads with Image.open(...).convert('RGB'), then dynamic_preprocess + transforms."""
    data = _photo_bytes(width, height, fmt, seed=width, mode=mode)
    config = TilingConfig(max_tiles=max_tiles)
    result = preprocessor.preprocess(data, config)
    reference = reference_pixels(Image.open(io.BytesIO(data)).convert("RGB"), 1, max_tiles).numpy()
    assert isinstance(result, PreprocessedImage)
    assert result.plan.num_tiles == reference.shape[0]
    assert np.array_equal(result.pixels, reference)


def test_plan_bytes_agrees_with_preprocess_on_the_corpus(preprocessor: Preprocessor) -> None:
    config = TilingConfig(max_tiles=6)
    checked = 0
    for item in hostile_corpus():
        if not item.ok:
            continue
        plan = preprocessor.plan_bytes(item.data, config)
        result = preprocessor.preprocess(item.data, config)
        assert plan == result.plan, item.name
        assert result.pixels.shape == (plan.num_tiles, 3, 448, 448)
        checked += 1
    assert checked >= 10


async def test_async_runs_on_the_pool_and_matches_sync(preprocessor: Preprocessor) -> None:
    inputs = [_photo_bytes(300 + 100 * i, 400, "PNG", seed=i) for i in range(4)]
    config = TilingConfig(max_tiles=4)
    loop_thread = threading.get_ident()
    seen_threads: set[int] = set()
    original = preprocessor.preprocess

    def recording(data: bytes, tiling: TilingConfig) -> PreprocessedImage:
        seen_threads.add(threading.get_ident())
        return original(data, tiling)

    preprocessor.preprocess = recording  # type: ignore[method-assign]
    results = await asyncio.gather(*(preprocessor.preprocess_async(data, config) for data in inputs))
    assert loop_thread not in seen_threads
    for data, result in zip(inputs, results, strict=True):
        assert np.array_equal(result.pixels, original(data, config).pixels)


async def test_async_errors_are_serving_errors(preprocessor: Preprocessor) -> None:
    with pytest.raises(ServingError) as caught:
        await preprocessor.preprocess_async(b"GIF89a broken", TilingConfig())
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT


async def test_closed_preprocessor_answers_unavailable() -> None:
    preprocessor = Preprocessor(ImageLimits())
    preprocessor.close()
    with pytest.raises(ServingError) as caught:
        await preprocessor.preprocess_async(_photo_bytes(10, 10, "PNG"), TilingConfig())
    assert caught.value.code is ErrorCode.UNAVAILABLE


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_is_the_float32_result_cast(dtype: str) -> None:
    data = _photo_bytes(700, 500, "JPEG", seed=9)
    config = TilingConfig(max_tiles=6)
    with (
        Preprocessor(ImageLimits(), dtype="float32") as fp32,
        Preprocessor(ImageLimits(), dtype=dtype) as low,
    ):
        full = torch.from_numpy(fp32.preprocess(data, config).pixels)
        reduced = low.preprocess(data, config).pixels
    if dtype == "float16":
        assert np.array_equal(reduced, full.half().numpy())
    else:
        assert reduced.dtype == np.uint16
        assert np.array_equal(reduced, full.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))


def test_bad_construction_arguments() -> None:
    with pytest.raises(ServingError, match="float64"):
        Preprocessor(ImageLimits(), dtype="float64")
    with pytest.raises(ServingError, match="max_workers is 0"):
        Preprocessor(ImageLimits(), max_workers=0)


def test_exif_rotated_photo_is_tiled_upright(preprocessor: Preprocessor) -> None:
    stored = Image.fromarray(np.zeros((300, 900, 3), np.uint8), "RGB")  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif.tobytes())
    plan = preprocessor.plan_bytes(buffer.getvalue(), TilingConfig())
    assert (plan.grid_cols, plan.grid_rows) == (1, 3)  # shown as a 300x900 portrait
