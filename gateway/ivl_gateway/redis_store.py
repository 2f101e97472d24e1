"""The gateway's Redis: one server or a Redis Cluster, chosen by settings; admission of calls; outages.

Modes (docs/gateway.md "Redis"):
- one server: `redis_url` = `redis://[user:password@]host:port/db`, or `rediss://...` for TLS (redis-py's
  URL options, e.g. `?ssl_ca_certs=/etc/ivl/redis-ca.pem`);
- Redis Cluster: the same URL naming any node, plus `redis_cluster=true` (redis-py's RedisCluster: it
  reads the slot map and talks to every primary; a multi-key read is split per slot).

Admission: at most `redis_max_connections` calls at once (each holds at most one connection per node); a call
that finds none free waits up to `redis_pool_wait_s` (`vision_cache_pool_waits_total`), and if none frees up it
is a miss for that request alone (`vision_cache_pool_wait_timeouts_total`): a burst is never an outage. redis-py's
pools underneath are sized to the same number, so they never refuse a connection themselves.

Outages never fail a chat: every call has a short timeout, a failure counts in
`vision_cache_errors_total{kind=...}`, one warning is logged per outage (at most one per `log_throttle_s`
while Redis flaps), and Redis is skipped for `redis_retry_s` before the next try; the first success
afterwards logs that caching resumed. A call that only timed out while another one succeeded meanwhile is a
miss for its request alone (a busy process, not Redis down).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import MaxConnectionsError

from ivl_gateway.log_throttle import LogThrottle
from ivl_gateway.metrics import GatewayMetrics
from ivl_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
T = TypeVar("T")
Client = aioredis.Redis | RedisCluster


class PoolBusy(Exception):
    """No call slot became free within redis_pool_wait_s (a burst, not an outage)."""


def build_client(settings: GatewaySettings) -> Client:
    """redis-py's client for the configured mode (no connection is made here)."""
    common: dict[str, Any] = {
        "max_connections": settings.redis_max_connections,
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "decode_responses": False,
    }
    if settings.redis_cluster:
        # The URL names any node: redis-py reads the slot map from it and keeps every node it learns as a
        # startup node for later. MOVED/ASK and a changed slot map are followed (one retry, no backoff: the
        # call budget is short).
        return RedisCluster.from_url(settings.redis_url, retry=Retry(NoBackoff(), 1), **common)
    return aioredis.Redis.from_url(settings.redis_url, retry=Retry(NoBackoff(), 0), **common)


class RedisStore:
    """The Redis of one gateway process. `enabled` is False without `redis_url`."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.cluster = settings.redis_cluster
        self.client: Client | None = build_client(settings) if settings.redis_url else None
        self._slots = asyncio.Semaphore(settings.redis_max_connections)
        self._skip_until = 0.0
        self._outage = False
        self._last_success = float("-inf")
        self._throttle = LogThrottle(settings.log_throttle_s)

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @property
    def available(self) -> bool:
        """False while Redis is being skipped after a failure."""
        return self.client is not None and time.monotonic() >= self._skip_until

    def _call_budget_s(self) -> float:
        return self._settings.redis_timeout_s * 2

    async def _admitted(self, work: Callable[[Client], Awaitable[T]]) -> T:
        assert self.client is not None
        if self._slots.locked():
            self._metrics.cache_pool_waits.inc()
        try:
            async with asyncio.timeout(self._settings.redis_pool_wait_s):
                await self._slots.acquire()
        except TimeoutError:
            self._metrics.cache_pool_timeouts.inc()
            raise PoolBusy(f"no Redis connection free within {self._settings.redis_pool_wait_s} s") from None
        try:
            async with asyncio.timeout(self._call_budget_s()):
                return await work(self.client)
        finally:
            self._slots.release()

    async def call(self, kind: str, work: Callable[[Client], Awaitable[T]]) -> T | None:
        """`work(client)` within the admission limit and the call budget; None when Redis is skipped, busy
        or failed (counted as `vision_cache_errors_total{kind}`)."""
        if not self.available:
            return None
        try:
            result = await self._admitted(work)
        except PoolBusy:
            return None  # a miss for this request only: the pool is busy, Redis is fine
        except MaxConnectionsError:
            self._metrics.cache_pool_timeouts.inc()  # redis-py's own cap (should not happen: sized alike)
            return None
        except (aioredis.RedisError, OSError, TimeoutError) as error:
            self._failed(kind, error)
            return None
        self._succeeded()
        return result

    def _failed(self, kind: str, error: BaseException) -> None:
        self._metrics.cache_errors.labels(kind=kind).inc()
        if isinstance(error, TimeoutError | aioredis.TimeoutError) and (
            time.monotonic() - self._last_success < self._settings.redis_pool_wait_s + self._call_budget_s()
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

    def _succeeded(self) -> None:
        self._last_success = time.monotonic()
        if self._outage:
            self._outage = False
            self._throttle.warning(log, "redis-back", "Redis embedding cache is back; caching resumed")

    # The operations the gateway uses -----------------------------------------------------------------
    async def mget(self, keys: Sequence[str], kind: str = "get") -> list[bytes | None] | None:
        """Values of `keys` in order (None: Redis skipped or failed). In a cluster the read is split per slot."""
        if not keys:
            return []

        async def read(client: Client) -> list[bytes | None]:
            if isinstance(client, RedisCluster):
                return list(await client.mget_nonatomic(list(keys)))
            return list(await client.mget(list(keys)))

        return await self.call(kind, read)

    async def set_many(self, entries: Iterable[tuple[str, bytes]], ttl_s: int) -> bool:
        """SET every (key, value) with a TTL in one pipeline (per node in a cluster). `entries` is consumed
        lazily, inside the call: nothing is encoded while Redis is being skipped."""

        async def store(client: Client) -> bool:
            async with client.pipeline(transaction=False) as pipe:
                for key, value in entries:
                    pipe.set(key, value, ex=ttl_s)
                await pipe.execute()
            return True

        return bool(await self.call("put", store))

    async def delete(self, key: str) -> None:
        await self.call("delete", lambda client: client.delete(key))

    async def ping(self) -> bool:
        """True when Redis answers (or is too busy to ask: every slot in use means it answers)."""
        if self.client is None:
            return False
        try:
            await self._admitted(lambda client: client.ping())
        except PoolBusy:
            return True
        except (aioredis.RedisError, OSError, TimeoutError, MaxConnectionsError):
            return False
        return True

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
