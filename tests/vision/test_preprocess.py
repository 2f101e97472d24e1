"""ivl_vision.preprocess: bytes -> tiles equal to the reference pipeline, in-process and in the sandboxed workers
(the workers' limits and hostile files are in test_decode_sandbox.py)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import numpy as np
import pytest
import pytest_asyncio
import torch
from ivl_proto.errors import ErrorCode, ServingError
from ivl_vision.image_io import ImageLimits
from ivl_vision.preprocess import PreprocessedImage, Preprocessor, SandboxLimits, preprocess_trusted
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


@pytest_asyncio.fixture
async def preprocessor() -> AsyncIterator[Preprocessor]:
    async with Preprocessor(ImageLimits(), dtype="float32", sandbox=SandboxLimits(workers=2)) as instance:
        yield instance


CASES = [
    (800, 600, "JPEG", "RGB", 12),
    (1200, 300, "PNG", "RGB", 6),
    (300, 1400, "PNG", "P", 6),
    (500, 500, "PNG", "RGBA", 12),
    (640, 200, "GIF", "RGB", 4),
    (256, 512, "JPEG", "L", 12),
]


@pytest.mark.parametrize(("width", "height", "fmt", "mode", "max_tiles"), CASES)
def test_preprocess_equals_reference_pipeline(width: int, height: int, fmt: str, mode: str, max_tiles: int) -> None:
    """The reference loads with Image.open(...).convert('RGB'), then dynamic_preprocess + transforms."""
    data = _photo_bytes(width, height, fmt, seed=width, mode=mode)
    result = preprocess_trusted(data, TilingConfig(max_tiles=max_tiles), ImageLimits())
    reference = reference_pixels(Image.open(io.BytesIO(data)).convert("RGB"), 1, max_tiles).numpy()
    assert isinstance(result, PreprocessedImage)
    assert result.plan.num_tiles == reference.shape[0]
    assert np.array_equal(result.pixels, reference)


async def test_sandboxed_tiles_are_bit_exact_with_in_process(preprocessor: Preprocessor) -> None:
    """Every case through the workers (pixels back through the pipe) equals the in-process result, concurrently."""
    inputs = [(_photo_bytes(w, h, fmt, seed=w, mode=mode), TilingConfig(max_tiles=t)) for w, h, fmt, mode, t in CASES]
    sizes = await asyncio.gather(*(preprocessor.probe(data) for data, _ in inputs))
    results = await asyncio.gather(
        *(preprocessor.tile(data, config, size) for (data, config), size in zip(inputs, sizes, strict=True))
    )
    for (data, config), result in zip(inputs, results, strict=True):
        expected = preprocessor.preprocess(data, config)
        assert result.plan == expected.plan
        assert result.pixels.dtype == expected.pixels.dtype and np.array_equal(result.pixels, expected.pixels)
    assert preprocessor.pool.stats.tasks == 2 * len(CASES)
    assert len(preprocessor.pool.pids) == 2


@pytest.mark.parametrize("threads", [2, 3])
async def test_sandboxed_tiles_with_threads_are_bit_exact(threads: int) -> None:
    """Workers that resize in bands on their own threads (IVL_VISION_DECODE_THREADS) give the same pixels as the
    serial in-process path, for every case and every dtype."""
    inputs = [(_photo_bytes(w, h, fmt, seed=w, mode=mode), TilingConfig(max_tiles=t)) for w, h, fmt, mode, t in CASES]
    inputs.append((_photo_bytes(3840, 2160, "JPEG", seed=4), TilingConfig(max_tiles=12)))
    for dtype in ("float32", "bfloat16"):
        async with Preprocessor(ImageLimits(), dtype=dtype, sandbox=SandboxLimits(workers=1, threads=threads)) as pre:
            for data, config in inputs:
                result = await pre.tile(data, config, await pre.probe(data))
                expected = preprocess_trusted(data, config, ImageLimits(), dtype)
                assert result.plan == expected.plan and np.array_equal(result.pixels, expected.pixels)


async def test_probe_agrees_with_decoding_on_the_corpus(preprocessor: Preprocessor) -> None:
    """The header plan equals the decoded plan for every good file; every bad one is refused with its code."""
    config = TilingConfig(max_tiles=6)
    checked = 0
    for item in hostile_corpus():
        if not item.ok:
            with pytest.raises(ServingError) as caught:
                size = await preprocessor.probe(item.data)
                await preprocessor.tile(item.data, config, size)
            assert caught.value.code is item.expected_code, (item.name, caught.value)
            assert item.message_part in caught.value.message, (item.name, caught.value.message)
            continue
        plan = await preprocessor.plan(item.data, config)
        result = preprocessor.preprocess(item.data, config)
        assert plan == result.plan, item.name
        assert result.pixels.shape == (plan.num_tiles, 3, 448, 448)
        checked += 1
    assert checked >= 10
    assert preprocessor.pool.stats.crashes == 0


async def test_closed_preprocessor_answers_unavailable() -> None:
    preprocessor = Preprocessor(ImageLimits(), sandbox=SandboxLimits(workers=1))
    await preprocessor.start()
    await preprocessor.close()
    with pytest.raises(ServingError) as caught:
        await preprocessor.probe(_photo_bytes(10, 10, "PNG"))
    assert caught.value.code is ErrorCode.UNAVAILABLE


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
async def test_reduced_precision_is_the_float32_result_cast(dtype: str) -> None:
    data = _photo_bytes(700, 500, "JPEG", seed=9)
    config = TilingConfig(max_tiles=6)
    full = torch.from_numpy(preprocess_trusted(data, config, ImageLimits(), "float32").pixels)
    async with Preprocessor(ImageLimits(), dtype=dtype, sandbox=SandboxLimits(workers=1)) as low:
        reduced = (await low.tile(data, config, await low.probe(data))).pixels
    if dtype == "float16":
        assert np.array_equal(reduced, full.half().numpy())
    else:
        assert reduced.dtype == np.uint16
        assert np.array_equal(reduced, full.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))


def test_bad_construction_arguments() -> None:
    with pytest.raises(ServingError, match="float64"):
        Preprocessor(ImageLimits(), dtype="float64")
    with pytest.raises(ServingError, match="must be positive"):
        SandboxLimits(workers=0)


async def test_exif_rotated_photo_is_tiled_upright(preprocessor: Preprocessor) -> None:
    stored = Image.fromarray(np.zeros((300, 900, 3), np.uint8), "RGB")  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif.tobytes())
    plan = await preprocessor.plan(buffer.getvalue(), TilingConfig())
    assert (plan.grid_cols, plan.grid_rows) == (1, 3)  # shown as a 300x900 portrait
