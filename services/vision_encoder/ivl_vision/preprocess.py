"""Image bytes -> normalised tiles: in sandboxed worker processes (the service) or in-process (tools).

`Preprocessor` owns a pool of decode workers (ivl_vision.decode_worker under ivl_proto.worker_pool).
The service never parses untrusted bytes itself: `probe` reads the header in a worker, `tile`
decodes and tiles there, and the pixels come back through a pipe straight into a numpy array. Each
task has a CPU-time budget (`cpu_s + cpu_s_per_megapixel * MP`, enforced by the kernel), a
wall-clock guard, and each worker an address-space limit; a caller that goes away (its asyncio task
cancelled) kills the worker running its image. Every way a worker can end becomes a ServingError
naming the limit. `preprocess_trusted` (no sandbox) is for trusted input: the CLI, benchmarks, tests.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
from ivl_proto.dtypes import numpy_dtype
from ivl_proto.errors import ErrorCode, ServingError, invalid
from ivl_proto.worker_pool import WorkerPool, WorkerPoolConfig, WorkerStopped

from ivl_vision.banded_resize import column_bands
from ivl_vision.decode_worker import limits_to_task, tiling_to_task
from ivl_vision.image_io import ImageLimits, decode_image
from ivl_vision.tiling import RAW, TilePlan, TilingConfig, normalise_tiles, plan_tiles, tile_pixels

WORKER_MODULE = "ivl_vision.decode_worker"


@dataclass(frozen=True)
class PreprocessedImage:
    pixels: np.ndarray  # (plan.num_tiles, 3, S, S); bfloat16 as uint16 bit patterns
    plan: TilePlan


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of the decode workers (IVL_VISION_DECODE_* settings)."""

    workers: int = 4  # more than cores is on purpose: see light_pixels
    light_pixels: int = 4_000_000  # with 2+ workers, the last free one only takes images up to this size
    cpu_s: float = 2.0  # CPU seconds any image may take to decode and tile ...
    cpu_s_per_megapixel: float = 0.05  # ... plus this per megapixel (a 4K photo: 2.4 s; 80 MP: 6 s)
    wall_s: float = 30.0  # wall-clock guard per task (a starved or stuck worker)
    memory_bytes: int = 1 << 30  # address space per worker beyond its imports
    recycle_rss_bytes: int = 512 << 20  # replace a worker whose RSS stays above this after a task
    threads: int = 1  # threads a worker resizes + normalises one image with (ivl_vision.banded_resize)

    def __post_init__(self) -> None:
        if self.threads < 1 or self.workers < 1 or self.cpu_s <= 0 or self.wall_s <= 0 or self.cpu_s_per_megapixel < 0:
            raise invalid(f"decode sandbox limits must be positive, got {self}")

    def cpu_budget(self, pixels: int) -> float:
        return self.cpu_s + self.cpu_s_per_megapixel * pixels / 1e6

    def pool_config(self) -> WorkerPoolConfig:
        return WorkerPoolConfig(
            module=WORKER_MODULE, size=self.workers, memory_bytes=self.memory_bytes,
            recycle_rss_bytes=self.recycle_rss_bytes, reserved_for_light=1 if self.workers > 1 else 0,
            light_cost=self.light_pixels,
        )


def preprocess_trusted(
    data: bytes, config: TilingConfig, limits: ImageLimits, dtype: str = "float32",
    executor: Executor | None = None, threads: int = 1, kernel: bool = True,
) -> PreprocessedImage:
    """Decode, plan and tile in the calling thread (the resizes on `executor`'s threads when given), without
    the sandbox: for trusted input only (the ivl-plan CLI, benchmarks, tests, training data made here).
    `kernel=False` resizes with Pillow instead of the exact kernel (the same pixels; for benchmarks)."""
    image = decode_image(data, limits)
    plan = plan_tiles(image.width, image.height, config)
    pixels = tile_pixels(image, plan, config, dtype, executor=executor, threads=threads, kernel=kernel)
    return PreprocessedImage(pixels=pixels, plan=plan)


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


class Preprocessor:
    """Decodes untrusted image bytes under `limits` in sandboxed workers and tiles them; one per service."""

    def __init__(self, limits: ImageLimits, dtype: str = "float32", sandbox: SandboxLimits | None = None) -> None:
        numpy_dtype(dtype, "the pixels")  # validates the name
        self._limits = limits
        self._dtype = dtype
        self.sandbox = sandbox or SandboxLimits()
        self.pool = WorkerPool(self.sandbox.pool_config(), name="decode")
        self._limits_task = limits_to_task(limits)

    @property
    def limits(self) -> ImageLimits:
        return self._limits

    @property
    def dtype(self) -> str:
        return self._dtype

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()

    async def __aenter__(self) -> Preprocessor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def preprocess(self, data: bytes, config: TilingConfig) -> PreprocessedImage:
        """`preprocess_trusted` with this preprocessor's limits and dtype (no sandbox)."""
        return preprocess_trusted(data, config, self._limits, self._dtype)

    async def probe(self, data: bytes) -> tuple[int, int]:
        """(width, height) from the header, read in a worker (no pixel decoded)."""
        result, _ = await self._run("probe", {"limits": self._limits_task}, data, self.sandbox.cpu_s, "read", cost=0)
        return int(result["width"]), int(result["height"])

    async def plan(self, data: bytes, config: TilingConfig) -> TilePlan:
        width, height = await self.probe(data)
        return plan_tiles(width, height, config)

    async def tile(self, data: bytes, config: TilingConfig, size: tuple[int, int]) -> PreprocessedImage:
        """Decode and tile an image whose probed size is `size`, in a worker; pixels bit-exact with
        `preprocess`."""
        plan = plan_tiles(size[0], size[1], config)
        shape = (plan.num_tiles, 3, config.image_size, config.image_size)
        raw = np.empty(shape, dtype=np.uint8)

        def receive(header: dict[str, Any]) -> memoryview:
            if list(header.get("shape", ())) != list(shape) or header.get("dtype") != RAW:
                raise ServingError(ErrorCode.INTERNAL, f"a decode worker returned {header.get('shape')} pixels for {shape}")
            return memoryview(raw).cast("B")

        # The worker sends RAW (uint8) tiles, a quarter of the float32 bytes through the pipe; the normalising
        # gather, the same table lookup the worker would have done, runs here off the event loop, on as many
        # threads (whole tiles each) as a worker resizes with.
        task = {"limits": self._limits_task, "tiling": tiling_to_task(config), "dtype": RAW,
                "expect_size": list(size), "threads": self.sandbox.threads}
        pixels_count = size[0] * size[1]
        await self._run("tile", task, data, self.sandbox.cpu_budget(pixels_count), "decode", receive, pixels_count)
        pixels = np.empty(shape, dtype=numpy_dtype(self._dtype, "the pixels"))
        await asyncio.gather(*(asyncio.to_thread(normalise_tiles, raw[start:stop], self._dtype, pixels[start:stop])
                               for start, stop in column_bands(plan.num_tiles, self.sandbox.threads)))
        return PreprocessedImage(pixels=pixels, plan=plan)

    async def _run(
        self, kind: str, task: dict[str, Any], data: bytes, cpu_s: float, verb: str, receive: Any = None,
        cost: float = 0.0,
    ) -> tuple[dict[str, Any], Any]:
        """One task in a worker; waiting tasks get workers smallest image first (header reads before all)."""
        sandbox = self.sandbox
        memory = (f"image needs more memory to {verb} than a decode worker may use "
                  f"({_gib(sandbox.memory_bytes)}, IVL_VISION_DECODE_MEMORY_MB)")
        try:
            return await self.pool.run(kind, task, data, cpu_s=cpu_s, wall_s=max(sandbox.wall_s, 2 * cpu_s),
                                       receive=receive, memory_message=memory, cost=cost)
        except WorkerStopped as stopped:
            raise self._stopped_error(stopped, verb, cpu_s) from None

    def _stopped_error(self, stopped: WorkerStopped, verb: str, cpu_s: float) -> ServingError:
        if stopped.reason == "cpu":
            return ServingError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"image took longer than {cpu_s:.1f} s of CPU time to {verb}; the limit for an image of this size "
                f"is {cpu_s:.1f} s (IVL_VISION_DECODE_CPU_S + IVL_VISION_DECODE_CPU_S_PER_MP per megapixel)",
            )
        if stopped.reason == "wall":
            return ServingError(
                ErrorCode.UNAVAILABLE,
                f"the vision service is overloaded: image did not finish its {verb} within "
                f"{max(self.sandbox.wall_s, 2 * cpu_s):.0f} s (IVL_VISION_DECODE_WALL_S); retry later",
            )
        return ServingError(
            ErrorCode.INVALID_ARGUMENT,
            f"could not decode image: the decoder stopped ({stopped.detail}); the file is corrupt or needs more "
            f"memory than a decode worker may use ({_gib(self.sandbox.memory_bytes)})",
        )
