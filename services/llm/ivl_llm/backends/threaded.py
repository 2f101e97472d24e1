"""A Generation whose engine runs in a worker thread and hands tokens to the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor

from ivl_llm.backends.base import PrefillStats

_DONE = object()

Emit = Callable[[int], None]
Report = Callable[[PrefillStats], None]


class ThreadedGeneration:
    """Runs `work(emit, cancelled, report)` on `executor`; the work calls emit(token_id) per token, checks
    `cancelled` (a threading.Event) before every step and may report(PrefillStats) before its first
    token (read as `prefill` once a token has arrived). Iterating yields the emitted ids."""

    def __init__(
        self, executor: Executor, work: Callable[[Emit, threading.Event, Report], None]
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._work = work
        self.prefill: PrefillStats | None = None
        future = self._loop.run_in_executor(executor, self._run)
        self.finished: asyncio.Future[None] = future

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody listens any more
            self._cancelled.set()

    def _run(self) -> None:
        try:
            self._work(self._put, self._cancelled, self._report)
        except BaseException as error:  # handed to the consumer, raised there
            self._put(error)
        finally:
            self._put(_DONE)

    def _report(self, stats: PrefillStats) -> None:
        self.prefill = stats  # written before the first token is queued, read after it is received

    def cancel(self) -> None:
        self._cancelled.set()

    async def __aiter__(self) -> AsyncIterator[int]:
        try:
            while True:
                item = await self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield int(item)  # type: ignore[call-overload]
        finally:
            self._cancelled.set()
