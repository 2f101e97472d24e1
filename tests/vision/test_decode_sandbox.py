"""The sandboxed decode workers under attack: CPU and wall budgets, memory limits, callers that leave,
crashes, recycling, and the global pixel budget. Real worker processes (python -m ivl_vision.decode_worker)."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from ivl_proto.errors import ErrorCode, ServingError
from ivl_vision.admission import PixelBudget
from ivl_vision.image_io import ImageLimits
from ivl_vision.preprocess import Preprocessor, SandboxLimits
from ivl_vision.tiling import TilingConfig
from PIL import Image
from support.hostile_images import png_bomb, progressive_jpeg_bomb
from support.service_processes import rss_bytes

CONFIG = TilingConfig(max_tiles=6)


def photo(width: int = 640, height: int = 480) -> bytes:
    rng = np.random.default_rng(width)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


async def still_works(preprocessor: Preprocessor) -> None:
    data = photo()
    result = await preprocessor.tile(data, CONFIG, await preprocessor.probe(data))
    assert np.array_equal(result.pixels, preprocessor.preprocess(data, CONFIG).pixels)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = progressive_jpeg_bomb(4000, 4000, 400)  # ~100 KB, tens of seconds of libjpeg work
    assert len(data) < 200_000
    return data


async def test_decode_time_bomb_is_stopped_at_its_cpu_budget(bomb: bytes) -> None:
    sandbox = SandboxLimits(workers=1, cpu_s=1.0, cpu_s_per_megapixel=0.0)
    async with Preprocessor(ImageLimits(), sandbox=sandbox) as preprocessor:
        size = await preprocessor.probe(bomb)  # the header is cheap: 16 MP, 410 scans (under the scan limit)
        assert size == (4000, 4000)
        pid = preprocessor.pool.pids[0]
        started = time.monotonic()
        with pytest.raises(ServingError) as caught:
            await preprocessor.tile(bomb, CONFIG, size)
        assert caught.value.code is ErrorCode.PAYLOAD_TOO_LARGE
        assert "took longer than 1.0 s of CPU time to decode; the limit" in caught.value.message
        assert time.monotonic() - started < 20  # 1 s of CPU (+1 s RLIMIT granularity), on a busy machine
        assert preprocessor.pool.stats.cpu_kills == 1
        assert not alive(pid)
        await still_works(preprocessor)


async def test_a_caller_that_leaves_kills_its_decode(bomb: bytes) -> None:
    async with Preprocessor(ImageLimits(), sandbox=SandboxLimits(workers=1, cpu_s=120)) as preprocessor:
        size = await preprocessor.probe(bomb)
        pid = preprocessor.pool.pids[0]
        task = asyncio.ensure_future(preprocessor.tile(bomb, CONFIG, size))
        await asyncio.sleep(1.0)
        assert alive(pid) and preprocessor.pool.busy == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not alive(pid)  # killed at once, not left decoding for minutes
        assert preprocessor.pool.stats.cancel_kills == 1
        await still_works(preprocessor)
        assert pid not in preprocessor.pool.pids


async def test_the_wall_clock_guard_stops_a_stalled_worker() -> None:
    sandbox = SandboxLimits(workers=1, cpu_s=0.5, cpu_s_per_megapixel=0.0, wall_s=1.5)
    async with Preprocessor(ImageLimits(), sandbox=sandbox) as preprocessor:
        data = photo()
        size = await preprocessor.probe(data)
        os.kill(preprocessor.pool.pids[0], signal.SIGSTOP)  # a worker that gets no CPU at all
        with pytest.raises(ServingError) as caught:
            await preprocessor.tile(data, CONFIG, size)
        assert caught.value.code is ErrorCode.UNAVAILABLE
        assert "did not finish its decode within" in caught.value.message
        assert preprocessor.pool.stats.wall_kills == 1
        await still_works(preprocessor)


async def test_an_image_over_the_memory_limit_is_refused_and_its_worker_replaced() -> None:
    big = png_bomb(8000, 8000, complete=True)  # 64 MP: ~200 MB as RGB, more than the 64 MB allowed here
    async with Preprocessor(ImageLimits(), sandbox=SandboxLimits(workers=1, memory_bytes=64 << 20)) as preprocessor:
        size = await preprocessor.probe(big)
        pid = preprocessor.pool.pids[0]
        with pytest.raises(ServingError) as caught:
            await preprocessor.tile(big, CONFIG, size)
        assert caught.value.code in (ErrorCode.PAYLOAD_TOO_LARGE, ErrorCode.INVALID_ARGUMENT)
        assert "memory" in caught.value.message, caught.value.message
        await still_works(preprocessor)
        assert pid not in preprocessor.pool.pids


async def test_sixteen_bit_images_decode_within_a_bounded_memory() -> None:
    """An 80 MP 16-bit PNG (~160 KB on the wire) needs its 160 MB of samples plus the 8-bit and RGB copies:
    it decodes within 800 MB of address space (the int64 conversion it once used needed 640 MB more)."""
    data = png_bomb(10000, 7999, complete=True, bit_depth=16)
    assert len(data) < 400_000
    sandbox = SandboxLimits(workers=1, memory_bytes=800 << 20, cpu_s=60, recycle_rss_bytes=0)
    async with Preprocessor(ImageLimits(), sandbox=sandbox) as preprocessor:
        pid = preprocessor.pool.pids[0]
        size = await preprocessor.probe(data)
        result = await preprocessor.tile(data, CONFIG, size)
        assert result.plan.num_tiles == 7
        peak, now = status_kib(pid, "VmHWM") << 10, rss_bytes(pid)
        assert peak > 400 << 20 and now < 200 << 20, (peak >> 20, now >> 20)  # the big buffers went back


async def test_the_largest_image_fits_the_default_memory_limit_with_threads() -> None:
    """An 80 MP image (the pixel limit) decodes and tiles with 4 resize threads per worker inside the default
    1 GiB of address space: each thread's stack (1 MiB) and the second malloc arena (MALLOC_ARENA_MAX=2) fit, and
    the banded resizes crop the source in bands of at most 8 MB."""
    data = png_bomb(10000, 7999, complete=True)
    sandbox = SandboxLimits(workers=1, cpu_s=60, threads=4, recycle_rss_bytes=0)
    async with Preprocessor(ImageLimits(), sandbox=sandbox) as preprocessor:
        pid = preprocessor.pool.pids[0]
        result = await preprocessor.tile(data, TilingConfig(max_tiles=12), await preprocessor.probe(data))
        assert result.plan.num_tiles == 13 and pid in preprocessor.pool.pids
        assert status_kib(pid, "Threads") == 5
        await still_works(preprocessor)


async def test_a_worker_left_above_its_rss_limit_is_replaced() -> None:
    data = png_bomb(6000, 6000, complete=True, bit_depth=16)
    async with Preprocessor(ImageLimits(), sandbox=SandboxLimits(workers=1, cpu_s=60)) as preprocessor:
        baseline = rss_bytes(preprocessor.pool.pids[0])
    sandbox = SandboxLimits(workers=1, cpu_s=60, recycle_rss_bytes=baseline + (20 << 20))
    async with Preprocessor(ImageLimits(), sandbox=sandbox) as preprocessor:
        pid = preprocessor.pool.pids[0]
        await preprocessor.tile(data, CONFIG, await preprocessor.probe(data))
        assert preprocessor.pool.stats.recycles == 1
        await still_works(preprocessor)
        assert pid not in preprocessor.pool.pids and not alive(pid)


async def test_a_crashed_worker_is_a_clear_error() -> None:
    async with Preprocessor(ImageLimits(), sandbox=SandboxLimits(workers=1, cpu_s=60)) as preprocessor:
        data = png_bomb(9000, 8000, complete=True)
        size = await preprocessor.probe(data)
        pid = preprocessor.pool.pids[0]
        task = asyncio.ensure_future(preprocessor.tile(data, CONFIG, size))
        await asyncio.sleep(0.3)
        os.kill(pid, signal.SIGSEGV)  # as a decoder bug would
        with pytest.raises(ServingError) as caught:
            await task
        assert caught.value.code is ErrorCode.INVALID_ARGUMENT
        assert "the decoder stopped (the worker ended (signal SIGSEGV))" in caught.value.message
        assert preprocessor.pool.stats.crashes == 1
        await still_works(preprocessor)


async def test_probe_refuses_extreme_sides_and_scan_counts_before_decoding() -> None:
    async with Preprocessor(ImageLimits(), sandbox=SandboxLimits(workers=1)) as preprocessor:
        for data, needle in [
            (png_bomb(1, 79_999_999, complete=False), "longest side may be at most 65535"),
            (progressive_jpeg_bomb(64, 64, 1000), "the JPEG has 1010 scans; the limit is 500"),
        ]:
            with pytest.raises(ServingError) as caught:
                await preprocessor.probe(data)
            assert caught.value.code is ErrorCode.PAYLOAD_TOO_LARGE and needle in caught.value.message
        assert preprocessor.pool.stats.crashes == preprocessor.pool.stats.cpu_kills == 0


@pytest.mark.parametrize(("aging_s", "expected"), [(60.0, ["a", "small", "big"]), (0.0, ["a", "big", "small"])])
async def test_pixel_budget_serves_small_images_first_with_aging(aging_s: float, expected: list[str]) -> None:
    """A small image does not queue behind a large one; once the large one has waited aging_s, it goes first."""
    budget = PixelBudget(capacity=100, max_wait_s=5, aging_s=aging_s)
    order: list[str] = []

    async def hold(name: str, pixels: int, seconds: float) -> None:
        async with budget.reserve(pixels):
            order.append(name)
            await asyncio.sleep(seconds)

    first = asyncio.ensure_future(hold("a", 80, 0.2))
    await asyncio.sleep(0.01)
    big = asyncio.ensure_future(hold("big", 100, 0.05))  # must wait for a
    await asyncio.sleep(0.01)
    small = asyncio.ensure_future(hold("small", 30, 0.05))  # must wait for a too (80 + 30 > 100)
    await asyncio.gather(first, big, small)
    assert order == expected
    assert budget.in_use == 0 and budget.stats.waits == 2


async def test_pixel_budget_gives_up_and_survives_cancellation() -> None:
    budget = PixelBudget(capacity=100, max_wait_s=0.2)
    async with budget.reserve(100):
        with pytest.raises(ServingError) as caught:
            async with budget.reserve(1):
                pass
        assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED and "waited 0.2 s" in caught.value.message
        waiter = asyncio.ensure_future(budget.reserve(50).__aenter__())
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert budget.in_use == 0 and budget.stats.timeouts == 1
    async with budget.reserve(10_000):  # larger than the capacity: takes all of it
        assert budget.in_use == 100


async def test_small_images_do_not_queue_behind_large_ones(bomb: bytes) -> None:
    """One worker, busy; a 64 MP decode and then a small photo wait: the photo gets the worker first."""
    async with Preprocessor(ImageLimits(), sandbox=SandboxLimits(workers=1, cpu_s=60)) as preprocessor:
        big, small = png_bomb(8000, 8000, complete=True), photo()
        big_size, small_size = await preprocessor.probe(big), await preprocessor.probe(small)
        blocker = asyncio.ensure_future(preprocessor.tile(bomb, CONFIG, (4000, 4000)))
        await asyncio.sleep(0.3)
        finished: list[str] = []

        async def tile(name: str, data: bytes, size: tuple[int, int]) -> None:
            await preprocessor.tile(data, CONFIG, size)
            finished.append(name)

        large_job = asyncio.ensure_future(tile("large", big, big_size))
        await asyncio.sleep(0.1)
        small_job = asyncio.ensure_future(tile("small", small, small_size))
        await asyncio.sleep(0.1)
        assert preprocessor.pool.waiting == 2
        blocker.cancel()
        await asyncio.gather(large_job, small_job)
        assert finished == ["small", "large"]


async def test_light_images_never_wait_for_large_ones_in_the_pixel_budget() -> None:
    budget = PixelBudget(capacity=100, max_wait_s=5, aging_s=0.0, light_pixels=5, light_reserve=10)
    async with budget.reserve(100):  # a large image fills the budget
        waiting_large = asyncio.ensure_future(budget.reserve(60).__aenter__())
        await asyncio.sleep(0.05)  # it has aged (aging_s=0): it is next in line, yet it cannot fit
        async with budget.reserve(5), budget.reserve(5):  # two light images go at once, within the reserve
            assert budget.in_use == 110
            assert not waiting_large.done()
    await waiting_large
    assert budget.in_use == 60
