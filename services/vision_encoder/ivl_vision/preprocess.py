"""Image bytes -> normalised tiles, synchronously or on a small thread pool.

PIL's decoders and resampling and numpy's gathers release the GIL, so `preprocess_async` runs the
whole decode + plan + tile step on a ThreadPoolExecutor and the event loop stays free.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from ivl_proto.errors import ErrorCode, ServingError, invalid

from ivl_vision.image_io import ImageLimits, decode_image, probe_image_size
from ivl_vision.tiling import TilePlan, TilingConfig, pixel_numpy_dtype, plan_tiles, tile_pixels


@dataclass(frozen=True)
class PreprocessedImage:
    pixels: np.ndarray  # (plan.num_tiles, 3, S, S); bfloat16 as uint16 bit patterns
    plan: TilePlan


class Preprocessor:
    """Decodes untrusted image bytes under `limits` and tiles them; one per service."""

    def __init__(self, limits: ImageLimits, dtype: str = "float32", max_workers: int = 2) -> None:
        pixel_numpy_dtype(dtype)  # validates the name
        if max_workers < 1:
            raise invalid(f"max_workers is {max_workers}; it must be at least 1")
        self._limits = limits
        self._dtype = dtype
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ivl-preprocess")

    @property
    def limits(self) -> ImageLimits:
        return self._limits

    @property
    def dtype(self) -> str:
        return self._dtype

    def preprocess(self, data: bytes, config: TilingConfig) -> PreprocessedImage:
        """Decode, plan and tile in the calling thread."""
        image = decode_image(data, self._limits)
        plan = plan_tiles(image.width, image.height, config)
        return PreprocessedImage(pixels=tile_pixels(image, plan, config, self._dtype), plan=plan)

    async def preprocess_async(self, data: bytes, config: TilingConfig) -> PreprocessedImage:
        """`preprocess` on the thread pool."""
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, self.preprocess, data, config)
        except RuntimeError as error:  # the pool was shut down
            raise ServingError(ErrorCode.UNAVAILABLE, "the image preprocessor is shut down") from error
        return await future

    def plan_bytes(self, data: bytes, config: TilingConfig) -> TilePlan:
        """The plan from the image header alone (no pixel decode); same result as `preprocess`."""
        width, height = probe_image_size(data, self._limits)
        return plan_tiles(width, height, config)

    def close(self) -> None:
        """Stop the pool; work already submitted finishes first. New async calls get UNAVAILABLE."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> Preprocessor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
