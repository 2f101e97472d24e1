"""PreviewPool: tile-preview rendering off the UI's event loop, bounded in concurrency, time and memory.

Every render runs `render_preview` (preview_render.py) in one of `workers` sandboxed worker processes
(ivl_frontend.preview_worker under ivl_proto.worker_pool: an address-space limit per worker, the render's
CPU time capped by the kernel), so a hostile picture can neither block the event loop nor keep a CPU
busy. A render that does not finish within `timeout_s` (waiting for a worker included) is given up and
its worker killed at once: the caller shows the caption without a picture. Two requests for the same
picture (same key) share one render (and its deadline), and one owner (a chat session) has at most
`per_owner` renders running (its others wait their turn), so one tab cannot take every worker from the
others. Tests may pass their own async `render`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.protobuf.json_format import MessageToDict
from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ServingError
from ivl_proto.worker_pool import WorkerPool, WorkerPoolConfig, WorkerStopped

from ivl_frontend.preview_render import DEFAULT_MAX_JPEG_SCANS, DEFAULT_MAX_PIXELS, PreviewRefused
from ivl_frontend.tile_preview import PREVIEW_MAX_SIDE

log = logging.getLogger(__name__)

Renderer = Callable[[bytes, common_pb2.ImagePlan], Awaitable[bytes]]


class PreviewUnavailable(RuntimeError):
    """No picture in time (busy or slow); the message says which."""



@dataclass(frozen=True)
class RenderLimits:
    max_side: int = PREVIEW_MAX_SIDE
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_jpeg_scans: int = DEFAULT_MAX_JPEG_SCANS
    memory_bytes: int = 512 << 20  # address space of a preview worker beyond its imports


class PreviewSandbox:
    """render_preview in sandboxed worker processes, started on first use in the serving event loop."""

    def __init__(self, workers: int, timeout_s: float, limits: RenderLimits) -> None:
        self.timeout_s = timeout_s
        self.limits = limits
        self.pool = WorkerPool(
            WorkerPoolConfig(module="ivl_frontend.preview_worker", size=workers, memory_bytes=limits.memory_bytes,
                             recycle_rss_bytes=256 << 20),
            name="preview",
        )
        self._starting: asyncio.Task[None] | None = None

    def start_soon(self) -> None:
        """Begin starting the workers (once, in the running event loop: the serving one)."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self.pool.start())

    async def started(self) -> None:
        """Wait until the workers have started; later calls return at once."""
        self.start_soon()
        assert self._starting is not None
        await asyncio.shield(self._starting)

    async def render(self, data: bytes, plan: common_pb2.ImagePlan) -> bytes:
        await self.started()
        task = {"plan": MessageToDict(plan, preserving_proto_field_name=True), "max_side": self.limits.max_side,
                "max_pixels": self.limits.max_pixels, "max_jpeg_scans": self.limits.max_jpeg_scans}
        try:
            _, png = await self.pool.run(
                "render", task, data, cpu_s=self.timeout_s, wall_s=self.timeout_s + 1.0,
                memory_message="the picture needs more memory than a preview may use",
            )
        except ServingError as error:
            raise PreviewRefused(error.message) from None
        except WorkerStopped as stopped:
            if stopped.reason in ("cpu", "wall"):
                raise PreviewUnavailable(f"rendering took longer than {self.timeout_s:g} s") from None
            raise PreviewRefused(f"could not be decoded for the preview ({stopped.detail})") from None
        return bytes(png or b"")

    def terminate(self) -> None:
        self.pool.terminate()


class _OwnerSlots:
    def __init__(self, size: int) -> None:
        self.slots = asyncio.Semaphore(size)
        self.users = 0  # renders running or waiting for this owner


class PreviewPool:
    def __init__(
        self, workers: int, timeout_s: float, render: Renderer | None = None, per_owner: int | None = None,
        limits: RenderLimits | None = None,
    ) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self.per_owner = per_owner if per_owner is not None else max(1, workers // 2)
        self.sandbox = None if render is not None else PreviewSandbox(workers, timeout_s, limits or RenderLimits())
        self._render: Renderer = render or self.sandbox.render  # type: ignore[union-attr]
        self._slots = asyncio.Semaphore(workers)
        self._jobs: dict[str, asyncio.Future[bytes]] = {}  # key -> the render running for it
        self._owners: dict[str, _OwnerSlots] = {}  # owner -> its slots (while it has renders)
        self.running = 0  # renders using a thread now, given-up ones included
        self.given_up = 0

    async def render(self, data: bytes, plan: common_pb2.ImagePlan, key: str = "", owner: str = "") -> bytes:
        """PNG bytes; raises PreviewRefused (the image) or PreviewUnavailable (no picture in time). The first
        call starts the sandboxed workers, which does not count against its deadline."""
        if self.sandbox is not None:
            await self.sandbox.started()
        deadline = time.monotonic() + self.timeout_s
        job = self._jobs.get(key) if key else None
        if job is None:
            job = await self._start(data, plan, key, owner, deadline)
        try:
            return await asyncio.wait_for(asyncio.shield(job), max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if job.cancelled() and current is not None and not current.cancelling():
                # another caller of this shared render gave up on it (its deadline came first)
                raise PreviewUnavailable(f"rendering took longer than {self.timeout_s:g} s") from None
            raise
        except TimeoutError:
            job.cancel()  # the render's worker is killed: its slot is free again at once
            self.given_up += 1
            log.warning("a tile preview took longer than %.1f s; shown without its picture", self.timeout_s)
            raise PreviewUnavailable(f"rendering took longer than {self.timeout_s:g} s") from None

    async def _start(
        self, data: bytes, plan: common_pb2.ImagePlan, key: str, owner: str, deadline: float
    ) -> asyncio.Future[bytes]:
        mine = self._owners.setdefault(owner, _OwnerSlots(self.per_owner))
        mine.users += 1
        got_own = False
        try:
            await asyncio.wait_for(mine.slots.acquire(), max(0.0, deadline - time.monotonic()))
            got_own = True
            await asyncio.wait_for(self._slots.acquire(), max(0.0, deadline - time.monotonic()))
        except BaseException as error:
            if got_own:
                mine.slots.release()
            self._forget_owner(owner)
            if not isinstance(error, TimeoutError):
                raise
            self.given_up += 1
            if got_own:
                raise PreviewUnavailable(f"the previews are busy ({self.workers} renders running)") from None
            raise PreviewUnavailable("this chat's earlier previews are still rendering") from None
        running = self._jobs.get(key) if key else None
        if running is not None:  # the same picture started while this one waited: share it
            self._slots.release()
            mine.slots.release()
            self._forget_owner(owner)
            return running
        self.running += 1
        job = asyncio.ensure_future(self._render(data, plan))
        if key:
            self._jobs[key] = job
        # Released when the thread is really done, not when its callers stop waiting.
        job.add_done_callback(lambda done: self._done(done, key, owner))
        return job

    def _done(self, job: asyncio.Future[bytes], key: str, owner: str) -> None:
        if not job.cancelled():
            job.exception()  # retrieved here: a given-up render's error is nobody else's
        self._release(key, owner)

    def _release(self, key: str, owner: str) -> None:
        self.running -= 1
        self._jobs.pop(key, None)
        self._slots.release()
        self._owners[owner].slots.release()
        self._forget_owner(owner)

    def _forget_owner(self, owner: str) -> None:
        mine = self._owners[owner]
        mine.users -= 1
        if mine.users == 0:
            del self._owners[owner]

    def close(self) -> None:
        """At shutdown (the serving loop may be gone): kill the preview workers."""
        if self.sandbox is not None:
            self.sandbox.terminate()


__all__ = ["PreviewPool", "PreviewRefused", "PreviewUnavailable"]
