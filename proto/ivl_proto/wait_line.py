"""A line of asyncio waiters served cheapest first, with aging so that nobody waits forever.

Used where requests of very different cost wait for a shared resource (a decode worker, the decoded-pixel
budget): a 1 MP photo should not queue behind a burst of 80 MP images, yet an 80 MP image must not be
overtaken forever. Rule: the waiter with the smallest cost goes next (ties: first come), unless the
oldest waiter has waited longer than `aging_s`; then the oldest goes next.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Waiter:
    cost: float
    seq: int
    since: float
    future: asyncio.Future[Any] = field(repr=False)


class WaitLine:
    def __init__(self, aging_s: float) -> None:
        self.aging_s = aging_s
        self._waiters: list[Waiter] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._waiters)

    def add(self, cost: float) -> Waiter:
        waiter = Waiter(cost, next(self._seq), time.monotonic(), asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        return waiter

    def discard(self, waiter: Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def peek(self, max_cost: float | None = None) -> Waiter | None:
        """The waiter to serve next among those costing at most max_cost (waiters whose future is done, e.g.
        cancelled, are dropped)."""
        self._waiters = [w for w in self._waiters if not w.future.done()]
        eligible = [w for w in self._waiters if max_cost is None or w.cost <= max_cost]
        if not eligible:
            return None
        oldest = min(eligible, key=lambda w: w.seq)
        if time.monotonic() - oldest.since > self.aging_s:
            return oldest
        return min(eligible, key=lambda w: (w.cost, w.seq))

    def pop(self, max_cost: float | None = None) -> Waiter | None:
        waiter = self.peek(max_cost)
        if waiter is not None:
            self._waiters.remove(waiter)
        return waiter
