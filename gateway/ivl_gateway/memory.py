"""Giving freed memory back to the OS after large requests (glibc only; a no-op elsewhere).

CPython frees a request's buffers, but glibc keeps the pages of its heaps and arenas for reuse: after a
burst of 60 MiB uploads the gateway's RSS stayed at the peak. `malloc_trim(0)` returns the free pages of
every arena. It runs in a worker thread (it takes arena locks, a few ms for a big heap), at most once
per `MIN_INTERVAL_S`, after a request of at least `malloc_trim_min_bytes` ended. `limit_arenas()` caps
glibc's malloc arenas (like MALLOC_ARENA_MAX) so that the gRPC and thread-pool threads don't each keep a
heap of their own; it must run before threads start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import time

log = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.5
_M_ARENA_MAX = -8  # glibc mallopt parameter


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(arenas: int) -> bool:
    """mallopt(M_ARENA_MAX, arenas); True when glibc took it. Call before any thread starts."""
    libc = _libc()
    if libc is None or arenas <= 0:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, arenas))


class MemoryTrimmer:
    def __init__(self, min_bytes: int) -> None:
        self._min_bytes = min_bytes
        self._libc = _libc() if min_bytes > 0 else None
        self._task: asyncio.Task[None] | None = None
        self._last = 0.0
        self.trims = 0

    @property
    def enabled(self) -> bool:
        return self._libc is not None

    def after_request(self, size: int) -> None:
        """A request of `size` bytes ended: trim soon if it was large (coalesced across a burst)."""
        if self._libc is None or size < self._min_bytes:
            return
        if self._task is not None and not self._task.done():
            return
        with contextlib.suppress(RuntimeError):  # no running loop (tests calling from a thread)
            self._task = asyncio.get_running_loop().create_task(self._trim())

    async def _trim(self) -> None:
        wait = self._last + MIN_INTERVAL_S - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        libc = self._libc
        if libc is None:
            return
        await asyncio.to_thread(libc.malloc_trim, 0)
        self._last = time.monotonic()
        self.trims += 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
