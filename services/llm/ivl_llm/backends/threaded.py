"""A Generation whose engine runs in a worker thread and hands tokens to the event loop."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from ivl_llm.backends.base import PrefillStats, TokenOut

_DONE = object()

Emit = Callable[[TokenOut], None]
Report = Callable[[PrefillStats], None]


@dataclass
class Control:
    """What the consumer tells the worker: stop everything (`cancelled`), or stop some choices (`stopped`)."""

    cancelled: threading.Event = field(default_factory=threading.Event)
    stopped: set[int] = field(default_factory=set)  # set.add is atomic: written by the loop, read by the worker


class ThreadedGeneration:
    """Runs `work(emit, control, report)` on `executor`; the work calls emit(TokenOut) per token, checks
    `control.cancelled` before every step (and `control.stopped` for choices ended early) and may
    report(PrefillStats) before its first token (read as `prefill` once a token has arrived). Iterating
    yields the emitted tokens. The work runs in a copy of the caller's context (request id for the logs)."""

    def __init__(self, executor: Executor, work: Callable[[Emit, Control, Report], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._control = Control()
        self._work = work
        self.prefill: PrefillStats | None = None
        context = contextvars.copy_context()
        future = self._loop.run_in_executor(executor, context.run, self._run)
        self.finished: asyncio.Future[None] = future

    def _put(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody listens any more
            self._control.cancelled.set()

    def _run(self) -> None:
        try:
            self._work(self._put, self._control, self._report)
        except BaseException as error:  # handed to the consumer, raised there
            self._put(error)
        finally:
            self._put(_DONE)

    def _report(self, stats: PrefillStats) -> None:
        self.prefill = stats  # written before the first token is queued, read after it is received

    def stop_choice(self, index: int) -> None:
        self._control.stopped.add(index)

    def cancel(self) -> None:
        self._control.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[TokenOut]:
        try:
            while True:
                item = await self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, TokenOut)
                yield item
        finally:
            self._control.cancelled.set()
