"""The global budget of decoded pixels in flight, shared by every request of one vision service.

Each decode reserves its image's width x height before a worker starts on it and gives it back when
the decode ends (however it ends). Waiting reservations are granted smallest first (a photo does not
queue behind a burst of 80 MP images), with aging (ivl_proto.wait_line): one that has waited more than
`aging_s` goes first, so a large image is not overtaken forever. Light images (at most `light_pixels`)
may go over the capacity by `light_reserve`: however many large images wait or decode, a photo never
waits for them (the worker pool keeps a worker for light images in the same way). A reservation that
waits longer than
`max_wait_s` gives up with RESOURCE_EXHAUSTED (retryable), so a burst of huge images cannot park a
normal request behind them until its deadline. What the budget bounds is the memory of decodes running
at once across all workers (about 3 bytes per pixel plus the tiles), independent of the worker count.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.wait_line import WaitLine


@dataclass
class BudgetStats:
    waits: int = 0
    timeouts: int = 0


class PixelBudget:
    def __init__(
        self, capacity: int, max_wait_s: float, aging_s: float = 5.0, light_pixels: int = 0, light_reserve: int = 0
    ) -> None:
        if capacity < 1 or max_wait_s < 0 or light_pixels < 0 or light_reserve < 0:
            raise ValueError(f"bad pixel budget: {capacity=}, {max_wait_s=}, {light_pixels=}, {light_reserve=}")
        self.capacity = capacity
        self.light_pixels = light_pixels
        self.light_reserve = light_reserve
        self.max_wait_s = max_wait_s
        self.in_use = 0
        self.stats = BudgetStats()
        self._line = WaitLine(aging_s)

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
        waiter = self._line.add(amount)
        self._wake()
        if waiter.future.done():  # granted at once: it fits, and nobody waiting goes before it
            return
        self.stats.waits += 1
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), timeout=self.max_wait_s)
        except TimeoutError:
            if waiter.future.done():  # granted just as the wait ran out: keep it
                return
            waiter.future.cancel()
            self._line.discard(waiter)
            self.stats.timeouts += 1
            self._wake()
            raise ServingError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"the vision service is decoding {self.in_use / 1e6:.0f} MP of images now (the limit is "
                f"{self.capacity / 1e6:.0f} MP, IVL_VISION_MAX_DECODE_PIXELS_IN_FLIGHT) and this image waited "
                f"{self.max_wait_s:g} s; retry later",
            ) from None
        except BaseException:  # cancelled while waiting, or just granted
            if waiter.future.done() and not waiter.future.cancelled():
                self.in_use -= amount
            waiter.future.cancel()
            self._line.discard(waiter)
            self._wake()
            raise

    def _fits(self, amount: int) -> bool:
        limit = self.capacity + (self.light_reserve if amount <= self.light_pixels else 0)
        return self.in_use + amount <= limit

    def _wake(self) -> None:
        """Grant waiting reservations in the line's order while the next one fits; when it does not, light
        ones may still go within their reserve."""
        while True:
            waiter = self._line.peek()
            if waiter is None:
                return
            if not self._fits(int(waiter.cost)):
                waiter = self._line.peek(max_cost=self.light_pixels)
                if waiter is None or not self._fits(int(waiter.cost)):
                    return
            self._line.discard(waiter)
            self.in_use += int(waiter.cost)
            waiter.future.set_result(None)
