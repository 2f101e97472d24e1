"""Single flight across gateway processes: a short Redis lock per new image.

Inside one process `singleflight.py` picks one owner per new image; the owner then claims the image's lock
in Redis, in one script that first looks for the entry itself (`claim`):
- CACHED: another gateway stored it meanwhile: use it;
- MINE: `SET <entry key>:lock <token> NX PX ttl` succeeded: encode, store the entry, then delete the lock
  (only if it is still ours). While the encode runs the lock is renewed every ttl/3 (`held`);
- THEIRS: another gateway holds it: poll the entry and the lock (one MGET, they share a slot) until the
  entry is there (use it) or the lock is gone without an entry (`wait`): its holder failed, was
  cancelled, or died and its lock expired after at most `encode_lock_ttl_s`; then claim it again.
Without Redis (none configured, down, or every connection busy) every claim is MINE: the encode runs as in a
gateway of its own. A waiter whose requests all went away is cancelled and simply stops polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import secrets
import time
from collections.abc import AsyncIterator, Sequence

from ivl_proto.errors import ErrorCode, ServingError

from ivl_gateway.metrics import GatewayMetrics
from ivl_gateway.redis_store import Client, RedisStore
from ivl_gateway.settings import GatewaySettings

# KEYS[1] entry, KEYS[2] lock (same slot: the entry key's hash tag); ARGV[1] token, ARGV[2] ttl in ms.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 2 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class Claim(enum.Enum):
    MINE = 1  # encode it (the lock is ours, or there is no Redis to share with)
    CACHED = 2  # its entry is in Redis now
    THEIRS = 3  # another gateway is encoding it


def lock_key(entry_key: str) -> str:
    return f"{entry_key}:lock"


class EncodeLocks:
    """The cross-gateway locks of one gateway process (one token for all its claims)."""

    def __init__(self, settings: GatewaySettings, store: RedisStore, metrics: GatewayMetrics) -> None:
        self._store = store
        self._metrics = metrics
        self._on = settings.encode_lock and store.enabled
        self._ttl_ms = int(settings.encode_lock_ttl_s * 1000)
        self._max_wait_s = settings.vision_timeout_s
        self._token = secrets.token_hex(16)
        self._releases: set[asyncio.Task[None]] = set()

    async def claim(self, keys: Sequence[str]) -> dict[str, Claim]:
        if not self._on or not keys:
            return dict.fromkeys(keys, Claim.MINE)

        async def run(client: Client) -> list[int]:
            return [int(v) for v in await asyncio.gather(
                *(client.eval(_CLAIM, 2, key, lock_key(key), self._token, self._ttl_ms) for key in keys))]

        answers = await self._store.call("lock", run)
        if answers is None:  # Redis skipped, busy or failing: encode as if alone
            return dict.fromkeys(keys, Claim.MINE)
        return {key: Claim(answer if answer else Claim.THEIRS.value) for key, answer in zip(keys, answers, strict=True)}

    @contextlib.asynccontextmanager
    async def held(self, keys: Sequence[str], claims: dict[str, Claim]) -> AsyncIterator[None]:
        """Renew the locks of `keys` claimed MINE while the block runs; release them after it (also when it
        fails or is cancelled: waiters elsewhere then take over at once instead of after the TTL)."""
        locked = [k for k in keys if claims.get(k) is Claim.MINE] if self._on else []
        renewer = asyncio.create_task(self._renew(locked)) if locked else None
        try:
            yield
        finally:
            if renewer is not None:
                renewer.cancel()
            if locked:  # in a task of its own: runs even while this one is being cancelled
                task = asyncio.create_task(self._release(locked))
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)

    async def _renew(self, keys: list[str]) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            await self._store.call("lock", lambda client: asyncio.gather(
                *(client.eval(_RENEW, 1, lock_key(k), self._token, self._ttl_ms) for k in keys)))

    async def _release(self, keys: list[str]) -> None:
        await self._store.call("lock", lambda client: asyncio.gather(
            *(client.eval(_RELEASE, 1, lock_key(k), self._token) for k in keys)))

    async def wait(self, keys: Sequence[str]) -> tuple[dict[str, bytes], list[str]]:
        """Poll until each key has an entry (returned) or no lock (returned as free to claim again)."""
        self._metrics.lock_waits.inc(len(keys))
        found: dict[str, bytes] = {}
        free: list[str] = []
        pending = list(keys)
        started = time.monotonic()
        pause = 0.02
        while pending:
            values = await self._store.mget([k for key in pending for k in (key, lock_key(key))], kind="lock")
            if values is None:  # no Redis to wait on: encode them here
                free.extend(pending)
                break
            still: list[str] = []
            for index, key in enumerate(pending):
                entry, lock = values[2 * index], values[2 * index + 1]
                if entry is not None:
                    found[key] = entry
                elif lock is None:  # its holder gave up or died (its lock expired): take over
                    free.append(key)
                    self._metrics.lock_takeovers.inc()
                else:
                    still.append(key)
            pending = still
            if pending:
                if time.monotonic() - started > self._max_wait_s:
                    raise ServingError(ErrorCode.DEADLINE_EXCEEDED, f"waited {self._max_wait_s:.0f} s for another "
                                       "gateway's encode of this image")
                await asyncio.sleep(pause)
                pause = min(pause * 1.5, 0.2)
        return found, free

    async def close(self) -> None:
        await asyncio.gather(*self._releases, return_exceptions=True)
