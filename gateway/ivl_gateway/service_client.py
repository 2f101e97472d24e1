"""What the vision and LLM clients share: the service's ReplicaSet, its Info, and the one place where
downstream calls are made (`unary`, `stream`: per-call metadata, deadlines and error mapping go here).

Info comes from the replica watch (every replica's own Info, all agreeing; refreshed every `dns_refresh_s`,
on `info(refresh=True)` and after `recheck()`). A chat uses the last Info known even while no replica
answers its Info read (a frozen or busy replica is still the same model; the call itself will tell). When
none ever answered, or on `info(refresh=True)` (/ready) when none answers now, one Info call goes through
the balanced channel, so the caller gets grpc's reason (UNAVAILABLE, ...).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message
from ivl_proto.errors import from_grpc_error

from ivl_gateway.replicas import Identity, ReplicaSet
from ivl_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
InfoT = TypeVar("InfoT", bound=Message)
Metadata = Sequence[tuple[str, str]]


class ServiceClient(Generic[InfoT]):
    """Base of the clients of one downstream service."""

    def __init__(
        self,
        name: str,
        addresses: list[str],
        stub_factory: Callable[[grpc.aio.Channel], Any],
        grpc_service: str,
        info_request: Message,
        identity: Identity,
        settings: GatewaySettings,
        drain_s: float,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        self.name = name
        self._settings = settings
        self._info_request = info_request
        self._stub_factory = stub_factory
        self._stubs: tuple[grpc.aio.Channel, Any] | None = None
        self.replicas: ReplicaSet[InfoT] = ReplicaSet(
            name, grpc_service, addresses, settings, self._fetch_info, identity, drain_s, interceptors)

    async def start(self) -> None:
        await self.replicas.start()

    async def close(self) -> None:
        await self.replicas.close()

    async def _fetch_info(self, channel: grpc.aio.Channel) -> InfoT:
        info: InfoT = await self._stub_factory(channel).Info(
            self._info_request, timeout=self._settings.info_timeout_s)
        return info

    @property
    def stub(self) -> Any:
        """The stub of the current balanced channel (a new one after the replica addresses changed)."""
        channel = self.replicas.channel
        if self._stubs is None or self._stubs[0] is not channel:
            self._stubs = (channel, self._stub_factory(channel))
        return self._stubs[1]

    async def unary(self, method: str, request: Message | bytes, timeout: float, metadata: Metadata = ()) -> Any:
        """One unary call on the balanced channel (grpc picks the replica and retries UNAVAILABLE)."""
        await self.replicas.settle()
        try:
            return await getattr(self.stub, method)(request, timeout=timeout, metadata=tuple(metadata) or None)
        except grpc.aio.AioRpcError as error:
            raise from_grpc_error(error, self.name) from error

    async def stream(
        self, method: str, request: Message | bytes, timeout: float, metadata: Metadata = ()
    ) -> AsyncIterator[Any]:
        """A server-streaming call; closing the iterator cancels the call downstream."""
        await self.replicas.settle()
        call = getattr(self.stub, method)(request, timeout=timeout, metadata=tuple(metadata) or None)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as error:
            raise from_grpc_error(error, self.name) from error
        finally:
            call.cancel()

    async def info(self, refresh: bool = False) -> InfoT:
        """The Info every replica shares (model id, hidden size, ...); FAILED_PRECONDITION when they disagree."""
        if refresh:  # /ready: is some replica answering now?
            await self.replicas.refresh()
        agreed = self.replicas.agreed_info()
        if agreed is not None and (self.replicas.answering() or not refresh):
            return agreed
        if not refresh:
            log.info("no Info known from the %s replicas (%s): asking through the channel", self.name,
                     self.replicas.describe())
        info: InfoT = await self.unary("Info", self._info_request, self._settings.info_timeout_s)
        self.replicas.remember_channel_info(info)
        return info

    def recheck(self) -> None:
        """Read every replica's Info again soon (an answer came from a model other than the agreed one)."""
        self.replicas.recheck()
