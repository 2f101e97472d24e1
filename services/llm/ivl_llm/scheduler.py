"""Concurrency slots with a bounded waiting queue (FIFO); RESOURCE_EXHAUSTED when the queue is full."""

from __future__ import annotations

import asyncio
from collections import deque

from ivl_proto.errors import ErrorCode, ServingError


class Slot:
    """One generation's right to run; release() is idempotent and may be called from any task."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler: Scheduler | None = scheduler

    def release(self) -> None:
        if self._scheduler is not None:
            scheduler, self._scheduler = self._scheduler, None
            scheduler._release()


class Scheduler:
    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self._free = max_concurrency
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def active(self) -> int:
        return self.max_concurrency - self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> Slot:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return Slot(self)
        if len(self._waiters) >= self.max_queue:
            raise ServingError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"the LLM service is busy: {self.active} request(s) generating (limit {self.max_concurrency}) "
                f"and {self.waiting} waiting (queue limit {self.max_queue}); retry later",
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self._release()  # the slot was handed over just as we were cancelled: pass it on
            raise
        return Slot(self)

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot straight to the next in line
                return
        self._free += 1
