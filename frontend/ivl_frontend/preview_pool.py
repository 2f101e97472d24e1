"""PreviewPool: tile-preview rendering off the UI's event loop, bounded in concurrency and in time.

Every render runs `render_preview` (preview_render.py) in one of `workers` threads (Pillow releases
the GIL while it decodes). A render that does not finish within `timeout_s` (waiting for a thread
included) is given up: the caller shows the caption without a picture. A thread cannot be killed, so
a given-up render keeps its slot until it really ends: however many hostile images arrive, at most
`workers` renders use the CPU, and the event loop never waits on one. Two requests for the same
picture (same key) share one render, and one owner (a chat session) has at most `per_owner` renders
running (its others wait their turn), so one tab cannot take every thread from the others.
(A sandboxed process pool with CPU/memory limits can take this class's place: same contract.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ivl_proto.common.v1 import common_pb2

from ivl_frontend.preview_render import PreviewRefused, render_preview

log = logging.getLogger(__name__)

Renderer = Callable[[bytes, common_pb2.ImagePlan], bytes]


class PreviewUnavailable(RuntimeError):
    """No picture in time (busy or slow); the message says which."""


class _OwnerSlots:
    def __init__(self, size: int) -> None:
        self.slots = asyncio.Semaphore(size)
        self.users = 0  # renders running or waiting for this owner


class PreviewPool:
    def __init__(
        self, workers: int, timeout_s: float, render: Renderer | None = None, per_owner: int | None = None
    ) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self.per_owner = per_owner if per_owner is not None else max(1, workers // 2)
        self._render: Renderer = render or render_preview
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ivl-preview")
        self._slots = asyncio.Semaphore(workers)
        self._jobs: dict[str, asyncio.Future[bytes]] = {}  # key -> the render running for it
        self._owners: dict[str, _OwnerSlots] = {}  # owner -> its slots (while it has renders)
        self.running = 0  # renders using a thread now, given-up ones included
        self.given_up = 0

    async def render(self, data: bytes, plan: common_pb2.ImagePlan, key: str = "", owner: str = "") -> bytes:
        """PNG bytes; raises PreviewRefused (the image) or PreviewUnavailable (no picture in time)."""
        deadline = time.monotonic() + self.timeout_s
        job = self._jobs.get(key) if key else None
        if job is None:
            job = await self._start(data, plan, key, owner, deadline)
        try:
            return await asyncio.wait_for(asyncio.shield(job), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
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
        job = asyncio.get_running_loop().run_in_executor(self._executor, self._render, data, plan)
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
        self._executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["PreviewPool", "PreviewRefused", "PreviewUnavailable"]
