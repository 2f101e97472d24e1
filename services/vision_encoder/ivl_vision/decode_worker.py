"""The sandboxed decode worker: `python -m ivl_vision.decode_worker` (started by ivl_proto.worker_pool).

Two task kinds, both on untrusted image bytes, both inside the worker's CPU and memory limits:
- "probe": the header only -> {"width", "height"} as the image will be decoded (after EXIF
  orientation), with the byte, pixel, side and JPEG-scan limits applied;
- "tile": decode, check the size is the probed one, plan and tile exactly as the reference
  (ivl_vision.tiling) -> {"plan", "shape", "dtype"} + the raw pixel bytes, which the pool reads
  straight into the caller's array.
Imports numpy, PIL and this package's pure modules only (no torch).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ivl_proto.errors import invalid
from ivl_proto.worker_loop import run_worker

from ivl_vision.exact_resize import exact_resize
from ivl_vision.image_io import ImageLimits, decode_image, probe_image_size
from ivl_vision.tiling import TilePlan, TilingConfig, pixel_storage, plan_tiles, tile_pixels


def limits_to_task(limits: ImageLimits) -> dict[str, Any]:
    return {
        "max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels, "max_side": limits.max_side,
        "max_jpeg_scans": limits.max_jpeg_scans, "apply_exif_orientation": limits.apply_exif_orientation,
        "alpha_background": list(limits.alpha_background) if limits.alpha_background is not None else None,
    }


def limits_from_task(task: dict[str, Any]) -> ImageLimits:
    values = dict(task["limits"])
    background = values.pop("alpha_background", None)
    return ImageLimits(**values, alpha_background=tuple(background) if background is not None else None)


def tiling_to_task(config: TilingConfig) -> dict[str, Any]:
    return {"image_size": config.image_size, "min_tiles": config.min_tiles, "max_tiles": config.max_tiles,
            "use_thumbnail": config.use_thumbnail}


def plan_to_dict(plan: TilePlan) -> dict[str, Any]:
    return {
        "grid_cols": plan.grid_cols, "grid_rows": plan.grid_rows, "num_tiles": plan.num_tiles,
        "resize_width": plan.resize_width, "resize_height": plan.resize_height,
        "has_thumbnail": plan.has_thumbnail, "original_width": plan.original_width,
        "original_height": plan.original_height,
    }


def _probe(task: dict[str, Any], payload: bytes | None) -> tuple[dict[str, Any], None]:
    width, height = probe_image_size(payload or b"", limits_from_task(task))
    return {"width": width, "height": height}, None


# Stack of each resize thread: Pillow and numpy need little, and every thread's stack counts toward the
# worker's address-space limit (the default is 8 MiB each).
THREAD_STACK_BYTES = 1 << 20


class _Tiler:
    """The "tile" task. Its output array is reused from task to task (grown when needed): a fresh 20 MB array
    per image costs thousands of page faults, more than sending it to the pool. With "threads" > 1 the
    resizes and gathers run in bands on a thread pool kept for the worker's life (ivl_vision.banded_resize;
    RLIMIT_CPU is per process, so the threads share the image's CPU budget)."""

    def __init__(self) -> None:
        self._buffer = np.empty(0, dtype=np.uint8)
        self._executor: ThreadPoolExecutor | None = None
        self._threads = 1
        # Import and self-check the exact resize kernel when the worker starts, not inside the first image's
        # CPU budget (ivl_vision.exact_resize; None means Pillow's resize).
        exact_resize()

    def _pool(self, threads: int) -> ThreadPoolExecutor | None:
        if threads <= 1:
            return None
        if self._executor is None or self._threads != threads:
            if self._executor is not None:
                self._executor.shutdown()
            previous = threading.stack_size(THREAD_STACK_BYTES)
            try:
                self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ivl-tile")
                # start every thread now, under the small stack size
                for future in [self._executor.submit(time.sleep, 0) for _ in range(threads)]:
                    future.result()
            finally:
                threading.stack_size(previous)
            self._threads = threads
        return self._executor

    def _out(self, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        storage = pixel_storage(dtype)
        size = int(np.prod(shape)) * storage.itemsize
        if self._buffer.nbytes < size:
            self._buffer = np.empty(size, dtype=np.uint8)
        return self._buffer[:size].view(storage).reshape(shape)

    def __call__(self, task: dict[str, Any], payload: bytes | None) -> tuple[dict[str, Any], memoryview]:
        started = time.process_time()
        image = decode_image(payload or b"", limits_from_task(task))
        expected = tuple(task["expect_size"])
        if image.size != expected:
            raise invalid(
                f"the image decodes to {image.width}x{image.height} but its header says {expected[0]}x{expected[1]}"
            )
        config = TilingConfig(**task["tiling"])
        plan = plan_tiles(image.width, image.height, config)
        dtype = str(task["dtype"])
        shape = (plan.num_tiles, 3, config.image_size, config.image_size)
        threads = max(1, int(task.get("threads", 1)))
        pixels = tile_pixels(image, plan, config, dtype, out=self._out(shape, dtype), executor=self._pool(threads),
                             threads=threads)
        image.close()
        header = {"plan": plan_to_dict(plan), "shape": list(pixels.shape), "dtype": dtype,
                  "cpu_s": time.process_time() - started}
        return header, memoryview(pixels).cast("B")


def handlers() -> dict[str, Any]:
    return {"probe": _probe, "tile": _Tiler()}


if __name__ == "__main__":
    run_worker(handlers())
