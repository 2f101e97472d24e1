"""The global budget of decoded pixels in flight, shared by every request of one vision service.

Each decode reserves its image's width x height before a worker starts on it and gives it back when
the decode ends (however it ends). Reservations are granted first come, first served: a large image at
the head of the line is not overtaken forever by small ones. A reservation that waits longer than
`max_wait_s` gives up with RESOURCE_EXHAUSTED (retryable), so a burst of huge images cannot park a
normal request behind them until its deadline. What the budget bounds is the memory of decodes running
at once across all workers (about 3 bytes per pixel plus the tiles), independent of the worker count.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ivl_proto.errors import ErrorCode, ServingError


@dataclass
class BudgetStats:
    waits: int = 0
    timeouts: int = 0


class PixelBudget:
    def __init__(self, capacity: int, max_wait_s: float) -> None:
        if capacity < 1 or max_wait_s < 0:
            raise ValueError(f"capacity must be >= 1 and max_wait_s >= 0, got {capacity}, {max_wait_s}")
        self.capacity = capacity
        self.max_wait_s = max_wait_s
        self.in_use = 0
        self.stats = BudgetStats()
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @contextlib.asynccontextmanager
    async def reserve(self, pixels: int) -> AsyncIterator[None]:
        """Hold `pixels` of the budget for the body of the `async with` (more than the capacity: all of it)."""
        amount = min(max(pixels, 1), self.capacity)
        await self._acquire(amount)
        try:
            yield
        finally:
            self.in_use -= amount
            self._wake()

    async def _acquire(self, amount: int) -> None:
        if not self._waiting and self.in_use + amount <= self.capacity:
            self.in_use += amount
            return
        self.stats.waits += 1
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (amount, future)
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout=self.max_wait_s)
        except TimeoutError:
            if future.done():  # granted just as the wait ran out: keep it
                return
            self._waiting.remove(entry)
            self.stats.timeouts += 1
            self._wake()
            raise ServingError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"the vision service is decoding {self.in_use / 1e6:.0f} MP of images now (the limit is "
                f"{self.capacity / 1e6:.0f} MP, IVL_VISION_MAX_DECODE_PIXELS_IN_FLIGHT) and this image waited "
                f"{self.max_wait_s:g} s; retry later",
            ) from None
        except BaseException:  # cancelled while waiting or just granted
            if future.done() and not future.cancelled():
                self.in_use -= amount
            elif entry in self._waiting:
                self._waiting.remove(entry)
            future.cancel()
            self._wake()
            raise

    def _wake(self) -> None:
        while self._waiting:
            amount, future = self._waiting[0]
            if future.done():
                self._waiting.popleft()
                continue
            if self.in_use + amount > self.capacity:
                return
            self._waiting.popleft()
            self.in_use += amount
            future.set_result(None)
