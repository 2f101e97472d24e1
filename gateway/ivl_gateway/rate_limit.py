"""Per-client rate limit, shared by the HTTP and gRPC edges: the `limits` library's moving window in memory
(exact: "10/minute" admits 10 in any 60 s; one gateway process, several replicas each count their own
clients; memory is one timestamp per admitted request per client, dropped when it leaves the window).

A client is identified by its API key when keys are configured and it presented a valid one, otherwise by
its IP address; every identity has the whole `rate_limit` (e.g. "60/minute;10/second": all of them must
allow a request, and a refused request consumes nothing).
"""

from __future__ import annotations

import math
import time

from ivl_proto.errors import ErrorCode, ServingError
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter


class RateLimited(ServingError):
    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(ErrorCode.RESOURCE_EXHAUSTED, message)
        self.retry_after_s = retry_after_s


class ClientRateLimit:
    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._items: list[RateLimitItem] = parse_many(spec) if spec else []
        self._limiter = MovingWindowRateLimiter(MemoryStorage()) if self._items else None

    @property
    def enabled(self) -> bool:
        return self._limiter is not None

    def check(self, identity: str) -> None:
        """Count one request of `identity`, or raise RateLimited (with the seconds to wait) when over."""
        limiter = self._limiter
        if limiter is None:
            return
        for item in self._items:
            if not limiter.test(item, identity):
                reset = limiter.get_window_stats(item, identity).reset_time
                wait = max(1, math.ceil(reset - time.time()))
                raise RateLimited(
                    f"too many requests from this client: the limit is {item} per client "
                    f"(rate_limit {self.spec!r}); retry in {wait} s",
                    wait,
                )
        for item in self._items:
            limiter.hit(item, identity)


def client_identity(api_key: str | None, key_valid: bool, ip: str | None) -> str:
    """The rate-limit bucket of a request: its valid API key, else its IP address."""
    if api_key and key_valid:
        return "key:" + api_key
    return "ip:" + (ip or "unknown")
