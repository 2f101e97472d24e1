"""Single flight: concurrent requests for the same new image share one encode."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """The first request to `claim` a key owns its work; later ones get a future to await.

    The owner must `resolve` or `fail` every key it owns (use try/finally). A waiter whose owner failed
    (or was cancelled) sees the exception and may claim the key again.
    """

    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Future[V]] = {}

    def claim(self, keys: list[K]) -> tuple[list[K], dict[K, asyncio.Future[V]]]:
        owned: list[K] = []
        waiting: dict[K, asyncio.Future[V]] = {}
        loop = asyncio.get_running_loop()
        for key in keys:
            if key in waiting or key in owned:
                continue
            future = self._inflight.get(key)
            if future is None:
                future = loop.create_future()
                self._inflight[key] = future
                owned.append(key)
            else:
                waiting[key] = future
        return owned, waiting

    def resolve(self, key: K, value: V) -> None:
        future = self._inflight.pop(key, None)
        if future is not None and not future.done():
            future.set_result(value)

    def fail(self, key: K, error: BaseException) -> None:
        future = self._inflight.pop(key, None)
        if future is not None and not future.done():
            future.set_exception(error)
            future.exception()  # mark retrieved: a key nobody waits for must not log "never retrieved"

    def __len__(self) -> int:
        return len(self._inflight)
