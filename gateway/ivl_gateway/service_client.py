"""What the vision and LLM clients share: a ReplicaPool of one service and its Info, cached.

Info is fetched once, again whenever the pool (re)connects a replica (its `on_change`), and on demand
(`info(refresh=True)`, or after `forget_info()`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message

from ivl_gateway.replicas import Replica, ReplicaPool, call_unary
from ivl_gateway.settings import GatewaySettings

InfoT = TypeVar("InfoT", bound=Message)


class ServiceClient(Generic[InfoT]):
    """Base of the clients of one downstream service: pool lifecycle and the service's Info."""

    def __init__(
        self,
        name: str,
        addresses: list[str],
        stub_factory: Callable[[grpc.aio.Channel], Any],
        info_request: Message,
        settings: GatewaySettings,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        self._settings = settings
        self._info_request = info_request
        self.pool = ReplicaPool(
            name,
            addresses,
            stub_factory,
            health_interval_s=settings.health_interval_s,
            backoff_s=settings.replica_backoff_s,
            dns_refresh_s=settings.dns_refresh_s,
            max_message_bytes=settings.max_message_bytes,
            on_change=self._refresh_replica_info,
            token=settings.internal_token,
            interceptors=interceptors,
        )
        self._info: InfoT | None = None

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()

    async def _refresh_replica_info(self, replica: Replica) -> None:
        replica.info = await replica.stub.Info(self._info_request, timeout=self._settings.info_timeout_s)
        self._info = replica.info

    async def info(self, refresh: bool = False) -> InfoT:
        """The service's Info (model id, hidden size, ...), fetched once and again on recovery or refresh."""
        if self._info is None or refresh:
            response, replica = await call_unary(self.pool, "Info", self._info_request, self._settings.info_timeout_s)
            replica.info = response
            self._info = response
        return self._info

    def forget_info(self) -> None:
        """Fetch Info again next time (e.g. a replica answered with another fingerprint)."""
        self._info = None
