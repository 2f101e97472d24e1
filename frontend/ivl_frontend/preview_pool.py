"""PreviewPool: tile-preview rendering off the UI's event loop, bounded in concurrency and in time.

Every render runs `render_preview` (preview_render.py) in one of `workers` threads (Pillow releases
the GIL while it decodes). A render that does not finish within `timeout_s` (waiting for a thread
included) is given up: the caller shows the caption without a picture. A thread cannot be killed, so
a given-up render keeps its slot until it really ends: however many hostile images arrive, at most
`workers` renders use the CPU, and the event loop never waits on one. (A sandboxed process pool
with CPU/memory limits can take this class's place: same `render()` contract.)
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


class PreviewPool:
    def __init__(self, workers: int, timeout_s: float, render: Renderer | None = None) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self._render: Renderer = render or render_preview
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ivl-preview")
        self._slots = asyncio.Semaphore(workers)
        self.running = 0  # renders using a thread now, given-up ones included
        self.given_up = 0

    async def render(self, data: bytes, plan: common_pb2.ImagePlan) -> bytes:
        """PNG bytes; raises PreviewRefused (the image) or PreviewUnavailable (no picture in time)."""
        deadline = time.monotonic() + self.timeout_s
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
        except TimeoutError:
            self.given_up += 1
            raise PreviewUnavailable(
                f"the previews are busy ({self.workers} renders running); no picture this time"
            ) from None
        loop = asyncio.get_running_loop()
        self.running += 1
        try:
            job = loop.run_in_executor(self._executor, self._render, data, plan)
        except BaseException:
            self._release()
            raise
        job.add_done_callback(self._done)  # when the thread is really done, not when we stop waiting
        try:
            return await asyncio.wait_for(asyncio.shield(job), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self.given_up += 1
            log.warning("a tile preview took longer than %.1f s; shown without its picture", self.timeout_s)
            raise PreviewUnavailable(f"rendering took longer than {self.timeout_s:g} s; no picture") from None

    def _done(self, job: asyncio.Future[bytes]) -> None:
        if not job.cancelled():
            job.exception()  # retrieved here: a given-up render's error is nobody else's
        self._release()

    def _release(self) -> None:
        self.running -= 1
        self._slots.release()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["PreviewPool", "PreviewRefused", "PreviewUnavailable"]
