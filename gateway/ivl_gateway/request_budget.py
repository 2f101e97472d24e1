"""One budget of request bytes held in memory at once, shared by every HTTP body and gRPC message.

A request takes its size from the budget before its bytes are buffered (HTTP: the declared
Content-Length, or step by step for a chunked body; gRPC: the received message) and gives it back when
it ends. A request that does not fit is refused at once (HTTP 503 + Retry-After, gRPC
RESOURCE_EXHAUSTED): memory stays bounded by `max_inflight_request_bytes` however many clients upload
at the same time, and the refusal costs nothing.

Requests of at most SMALL_REQUEST_BYTES (a text-only chat) are not counted: a budget filled by uploads
must not lock out the normal user's small request. Their memory is bounded by the connection cap
(http_max_connections x 64 KiB = 64 MiB at the defaults).
"""

from __future__ import annotations

from ivl_proto.errors import ErrorCode, ServingError
from prometheus_client import Gauge

SMALL_REQUEST_BYTES = 64 * 1024


class BudgetFull(ServingError):
    """The request does not fit in the in-flight request-bytes budget now (retry shortly)."""

    retry_after_s = 1


class ByteBudget:
    def __init__(self, limit: int, gauge: Gauge | None = None) -> None:
        self.limit = limit
        self.in_use = 0
        self._gauge = gauge

    @staticmethod
    def counts(size: int) -> bool:
        """Whether a request of `size` bytes takes from the budget (small ones don't)."""
        return size > SMALL_REQUEST_BYTES

    def try_take(self, size: int) -> bool:
        if size < 0:
            raise ValueError("size must be >= 0")
        if self.in_use + size > self.limit:
            return False
        self.in_use += size
        self._report()
        return True

    def take(self, size: int) -> None:
        """Take `size` bytes or raise BudgetFull with a message naming the limit."""
        if not self.try_take(size):
            raise BudgetFull(
                ErrorCode.OVERLOADED,
                f"the gateway is holding {self.in_use / 2**20:.1f} MiB of request data from other clients and "
                f"this request needs {size / 2**20:.1f} MiB more; the limit is {self.limit / 2**20:.1f} MiB "
                "at once (max_inflight_request_bytes); retry in a moment",
            )

    def give_back(self, size: int) -> None:
        self.in_use = max(0, self.in_use - size)
        self._report()

    def _report(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.in_use)
