"""The Redis embedding cache: lookups, stores, the per-image tiling memory, and survival of Redis outages.

Redis down or slow never fails a chat: every operation has a short timeout, a failure counts in
`vision_cache_errors_total{kind=...}`, one warning is logged per outage (and at most one per
`log_throttle_s` while Redis flaps), and Redis is skipped for `redis_retry_s` before the next attempt;
the first success afterwards logs that caching resumed.

A burst is not an outage: connections come from a blocking pool of `redis_max_connections`; a call that
finds none free waits up to `redis_pool_wait_s` (counted in `vision_cache_pool_waits_total`), and if
still none is free it is a miss for that request alone (`vision_cache_pool_wait_timeouts_total`),
while Redis stays on for everyone else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from ivl_gateway.embedding_codec import (
    CorruptEntry,
    ImageEmbedding,
    TilingChoice,
    cache_key,
    decode_entry,
    encode_entry,
)
from ivl_gateway.log_throttle import LogThrottle
from ivl_gateway.metrics import GatewayMetrics
from ivl_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class PoolBusy(Exception):
    """No pooled Redis connection became free within redis_pool_wait_s (a burst, not an outage)."""


class CountingBlockingPool(aioredis.BlockingConnectionPool):
    """redis-py's BlockingConnectionPool that counts waits and turns a wait timeout into PoolBusy."""

    def __init__(self, metrics: GatewayMetrics, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._metrics = metrics

    async def get_connection(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        if not self.can_get_connection():
            self._metrics.cache_pool_waits.inc()
        try:
            return await super().get_connection(*args, **kwargs)
        except RedisConnectionError as error:
            if isinstance(error.__cause__, TimeoutError | asyncio.TimeoutError):
                self._metrics.cache_pool_timeouts.inc()
                raise PoolBusy(str(error)) from error
            raise


class EmbeddingCache:
    """Embeddings keyed by (vision fingerprint, image sha256, tiling). `enabled` is False without Redis."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._namespace = settings.cache_namespace
        self._redis: aioredis.Redis | None = None
        if settings.redis_url:
            pool = CountingBlockingPool.from_url(
                settings.redis_url,
                metrics=metrics,
                max_connections=settings.redis_max_connections,
                timeout=settings.redis_pool_wait_s,
                socket_timeout=settings.redis_timeout_s,
                socket_connect_timeout=settings.redis_timeout_s,
                retry=Retry(NoBackoff(), 0),
                decode_responses=False,
            )
            self._redis = aioredis.Redis.from_pool(pool)
        self._skip_until = 0.0
        self._outage = False
        self._last_success = float("-inf")
        self._throttle = LogThrottle(settings.log_throttle_s)

    @property
    def enabled(self) -> bool:
        return self._redis is not None

    @property
    def available(self) -> bool:
        """False while Redis is being skipped after a failure."""
        return self._redis is not None and time.monotonic() >= self._skip_until

    def key(self, fingerprint: str, digest: str, tiling: TilingChoice) -> str:
        return cache_key(self._namespace, fingerprint, digest, tiling)

    def _tiling_key(self, fingerprint: str, digest: str) -> str:
        return f"{self._namespace}:{fingerprint}:{digest}:tiling"

    def _failed(self, kind: str, error: BaseException) -> None:
        self._metrics.cache_errors.labels(kind=kind).inc()
        if isinstance(error, TimeoutError | aioredis.TimeoutError) and (
            time.monotonic() - self._last_success < self._call_budget_s()
        ):
            # Another call succeeded while this one was under way: Redis answers, this process is just
            # busy (a burst on a loaded machine). A miss for this request only, not an outage for everyone.
            return
        self._skip_until = time.monotonic() + self._settings.redis_retry_s
        if not self._outage:
            self._outage = True
            self._throttle.warning(
                log, "redis-down", "Redis embedding cache unavailable (%s: %s); serving uncached, retrying every "
                "%.1f s", kind, error or type(error).__name__, self._settings.redis_retry_s,
            )

    def _call_budget_s(self) -> float:
        return self._settings.redis_pool_wait_s + self._settings.redis_timeout_s * 2

    def _succeeded(self) -> None:
        self._last_success = time.monotonic()
        if self._outage:
            self._outage = False
            self._throttle.warning(log, "redis-back", "Redis embedding cache is back; caching resumed")

    async def _call(self, kind: str, coro_factory: Callable[[], Awaitable[T]]) -> T | None:
        if not self.available:
            return None
        try:
            result = await asyncio.wait_for(coro_factory(), timeout=self._call_budget_s())
        except PoolBusy:
            return None  # a miss for this request only: the pool is busy, Redis is fine
        except (aioredis.RedisError, OSError, TimeoutError) as error:
            self._failed(kind, error)
            return None
        self._succeeded()
        return result

    async def get_many(self, keys: list[str], expected_hidden: int | None) -> list[ImageEmbedding | None]:
        """One MGET; a missing, corrupt or mismatched entry is None (corrupt ones are deleted)."""
        if not keys or self._redis is None:
            return [None] * len(keys)
        redis = self._redis
        values = await self._call("get", lambda: redis.mget(keys))
        if values is None:
            return [None] * len(keys)
        found: list[ImageEmbedding | None] = []
        for key, value in zip(keys, values, strict=True):
            if value is None:
                found.append(None)
                continue
            try:
                found.append(decode_entry(key, bytes(value), expected_hidden))
            except CorruptEntry as error:
                log.warning("dropping a corrupt cache entry %s: %s", key, error)
                self._metrics.cache_errors.labels(kind="corrupt").inc()
                await self._call("delete", lambda k=key: redis.delete(k))
                found.append(None)
        return found

    async def _set_many(self, entries: Iterable[tuple[str, bytes]]) -> None:
        """SET every (key, value) with the cache TTL in one pipeline. `entries` is consumed lazily, inside the
        call: nothing is encoded while Redis is being skipped."""
        if self._redis is None:
            return
        redis = self._redis
        ttl = self._settings.cache_ttl_s

        async def store() -> None:
            async with redis.pipeline(transaction=False) as pipe:
                for key, value in entries:
                    pipe.set(key, value, ex=ttl)
                await pipe.execute()

        await self._call("put", store)

    async def put_many(self, items: list[tuple[str, ImageEmbedding]]) -> None:
        if items:
            await self._set_many((key, encode_entry(key, embedding)) for key, embedding in items)

    async def remembered_tiling(self, fingerprint: str, digests: list[str]) -> list[TilingChoice | None]:
        """The tiling each image was last encoded with (for earlier turns' images)."""
        if not digests or self._redis is None:
            return [None] * len(digests)
        redis = self._redis
        keys = [self._tiling_key(fingerprint, d) for d in digests]
        values = await self._call("get", lambda: redis.mget(keys))
        if values is None:
            return [None] * len(digests)
        return [_parse_tiling(v) for v in values]

    async def remember_tiling(self, fingerprint: str, items: list[tuple[str, TilingChoice]]) -> None:
        if items:
            await self._set_many((self._tiling_key(fingerprint, digest), tiling.tag().encode())
                                 for digest, tiling in items)

    async def ping(self) -> bool:
        if self._redis is None:
            return False
        redis = self._redis
        try:
            await asyncio.wait_for(redis.ping(),
                                   timeout=self._settings.redis_pool_wait_s + self._settings.redis_timeout_s * 2)
        except PoolBusy:
            return True  # every connection is busy serving: Redis answers
        except (aioredis.RedisError, OSError, TimeoutError):
            return False
        return True

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def _parse_tiling(value: bytes | None) -> TilingChoice | None:
    if not value:
        return None
    try:
        max_tiles, min_tiles, thumb = bytes(value).decode()[1:].split("-")
        return TilingChoice(int(max_tiles), int(min_tiles), thumb == "1")
    except ValueError:
        return None
