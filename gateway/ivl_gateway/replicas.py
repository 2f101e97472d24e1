"""The replicas of one downstream service: one balanced grpc channel, and a watch on what grpc cannot see.

grpc does the balancing (the service config below): round robin over every address; client-side health
checking (grpc.health.v1 Watch: a replica NOT_SERVING, still loading or unreachable gets no calls, and
gets them again the moment it says SERVING); calls that fail UNAVAILABLE before any response are retried
on the next replica (`retryPolicy`; a streaming Generate only until its first message, grpc commits a
call when the response starts); reconnect backoff of a replica that went away (`replica_backoff_s` at most).

By hand, what grpc does not do:
- Notice new addresses. grpc's DNS resolver re-resolves only after a connection fails, never on a timer
  (grpc/grpc#12295), so a replica added to a headless Service would get no calls. Every `dns_refresh_s`
  the targets are resolved here; when the set of addresses changes a new channel takes the new calls
  and the old one is closed with a grace period: its running calls finish.
- Read each replica's Info, over a small channel of its own, and refuse replicas that disagree on
  `identity` (the vision fingerprint; the LLM's model, template, hidden size and context): the gateway's
  cache keys and prompts belong to one model, so mixing replicas of two models would depend on which
  one answered. `agreed_info()` raises FAILED_PRECONDITION naming the replicas and what differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message
from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.internal_auth import token_client_interceptors

from ivl_gateway.replica_targets import Target, channel_target, parse_target, resolve_all
from ivl_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
InfoT = TypeVar("InfoT", bound=Message)
Identity = Callable[[Any], tuple[tuple[str, object], ...]]


def service_config(service: str, attempts: int) -> dict[str, Any]:
    """round_robin + grpc.health.v1 health checking + retries of UNAVAILABLE for every method of `service`."""
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": ""},
        "methodConfig": [{
            "name": [{"service": service}],
            "retryPolicy": {
                "maxAttempts": attempts, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }],
        # No retry storms: retries stop while more than half of the recent calls fail (gRFC A6).
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }


def redial_options(settings: GatewaySettings) -> list[tuple[str, Any]]:
    """Reconnect within REPLICA_BACKOFF_S (grpc's default backoff grows to 120 s): the balanced channel and
    each replica's Info channel alike, so a replica that came up after the gateway is read at the next round."""
    backoff_ms = int(settings.replica_backoff_s * 1000)
    return [
        ("grpc.initial_reconnect_backoff_ms", min(backoff_ms, 1000)),
        ("grpc.min_reconnect_backoff_ms", min(backoff_ms, 1000)),
        ("grpc.max_reconnect_backoff_ms", max(backoff_ms, 100)),
    ]


def channel_options(settings: GatewaySettings, service: str) -> list[tuple[str, Any]]:
    return [
        *message_size_options(settings.max_message_bytes),
        ("grpc.service_config", json.dumps(service_config(service, settings.replica_attempts))),
        ("grpc.service_config_disable_resolution", 1),  # ours only, never one from DNS TXT records
        ("grpc.enable_retries", 1),
        # A call is retried only while grpc still holds what it sent: up to a whole message (an EncodeImages
        # request carries the images, a Generate request the embeddings). grpc's default is 256 KiB.
        ("grpc.per_rpc_retry_buffer_size", settings.max_message_bytes),
        ("grpc.retry_buffer_size", 2 * settings.max_message_bytes),
        *redial_options(settings),
        ("grpc.dns_min_time_between_resolutions_ms", 1000),
    ]


@dataclass(frozen=True)
class ReplicaState:
    address: str
    info: Any = None  # the last Info it answered (None: never)
    error: str = ""  # why the latest read failed ("" when it answered)

    @property
    def answered(self) -> bool:
        """It answered the latest read."""
        return self.info is not None and not self.error


class ReplicaSet(Generic[InfoT]):
    """`channel` balances every call of one service; `agreed_info()` is the Info all its replicas share."""

    def __init__(
        self,
        service: str,
        grpc_service: str,
        entries: Sequence[str],
        settings: GatewaySettings,
        fetch_info: Callable[[grpc.aio.Channel], Awaitable[InfoT]],
        identity: Identity,
        drain_s: float,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        self.service = service
        self._targets: list[Target] = [parse_target(e) for e in entries]
        self._settings = settings
        self._options = channel_options(settings, grpc_service)
        # the internal token, then the caller's (request id + trace context metadata) on every call
        self._interceptors = [*token_client_interceptors(settings.internal_token), *interceptors] or None
        self._fetch_info = fetch_info
        self._identity = identity
        self._drain_s = drain_s  # the longest a call of this service may run (closing an old channel waits that long)
        self._addresses: list[str] = []
        self._states: dict[str, ReplicaState] = {}
        self._info_channels: dict[str, grpc.aio.Channel] = {}
        self._channel: grpc.aio.Channel | None = None
        self.target = ""
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()
        self._refresh_lock = asyncio.Lock()
        self._last_verdict = ""
        self._channel_info: InfoT | None = None  # the last Info a call through the balanced channel answered

    @property
    def channel(self) -> grpc.aio.Channel:
        assert self._channel is not None, "ReplicaSet.start() first"
        return self._channel

    @property
    def addresses(self) -> list[str]:
        return list(self._addresses)

    @property
    def states(self) -> list[ReplicaState]:
        return [self._states.get(a, ReplicaState(a)) for a in self._addresses]

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._watch(), name=f"{self.service}-replicas")

    def recheck(self) -> None:
        """Resolve and read every replica's Info now (e.g. an answer came from an unexpected model)."""
        self._wake.set()

    async def refresh(self) -> None:
        """Resolve the targets (a new channel when the addresses changed), then Info from every replica."""
        async with self._refresh_lock:
            addresses = await resolve_all(self._targets)
            if not addresses and self._channel is not None:
                # A name that resolves to nothing now (a DNS hiccup, or every pod gone): keep the channel
                # and its connections; grpc's own resolver and health checks say whether anything answers.
                addresses = self._addresses
            target = channel_target(self._targets, addresses)
            if self._channel is None or target != self.target or addresses != self._addresses:
                self._use_channel(target, addresses)
            for gone in [a for a in self._info_channels if a not in addresses]:
                self._close_later(self._info_channels.pop(gone), 0)
                self._states.pop(gone, None)
            states = await asyncio.gather(*(self._read_info(a) for a in addresses))
            self._states = {s.address: s for s in states}
            self._log_verdict()

    def _use_channel(self, target: str, addresses: list[str]) -> None:
        if self._channel is not None:
            log.info("%s replicas now %s (were %s): new calls take a new channel, running ones finish",
                     self.service, ", ".join(addresses) or "none", ", ".join(self._addresses) or "none")
            self._close_later(self._channel, self._drain_s)
        self._channel = grpc.aio.insecure_channel(target, options=self._options, interceptors=self._interceptors)
        self._channel.get_state(try_to_connect=True)  # connect (and start watching health) before the first call
        self.target, self._addresses = target, addresses

    def _close_later(self, channel: grpc.aio.Channel, grace_s: float) -> None:
        task = asyncio.create_task(channel.close(grace_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _read_info(self, address: str) -> ReplicaState:
        channel = self._info_channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(
                address, options=[*message_size_options(self._settings.max_message_bytes),
                                  *redial_options(self._settings)],
                interceptors=self._interceptors)
            self._info_channels[address] = channel
        try:
            return ReplicaState(address, await self._fetch_info(channel))
        except grpc.aio.AioRpcError as error:  # keeps what it answered before (a slow or frozen replica)
            last = self._states.get(address)
            return ReplicaState(address, last.info if last else None, f"{error.code().name}: {error.details()}")

    def connected(self) -> bool:
        """The balanced channel has a replica connected and SERVING (grpc's channel state READY) now."""
        return self.channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY

    async def wait_connected(self, timeout_s: float) -> bool:
        """True once the balanced channel is READY, waiting at most `timeout_s` for it."""
        if self.connected():
            return True
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout_s)
        except TimeoutError:
            return False
        return True

    def reachable(self) -> bool:
        """Some replica's own Info channel is connected now (the replica is up, whatever the balanced channel
        says: each channel redials a replica that was away on its own jittered schedule)."""
        return any(c.get_state() is grpc.ChannelConnectivity.READY for c in self._info_channels.values())

    async def settle(self) -> None:
        """Before a call: when the balanced channel has no connected replica but some replica is reachable on
        its own Info channel, the balanced channel is only waiting out its redial backoff (a replica that came
        up or back a moment ago): wait for it, at most REPLICA_BACKOFF_S + 1 s, instead of failing the call
        with UNAVAILABLE at once. When no replica is reachable the call goes ahead and fails fast."""
        if not self.connected() and self.reachable():
            await self.wait_connected(self._settings.replica_backoff_s + 1.0)

    def channel_state(self) -> str:
        """The balanced channel's grpc connectivity state, for /ready."""
        return str(self.channel.get_state().name)

    def _groups(self) -> dict[tuple[tuple[str, object], ...], list[str]]:
        groups: dict[tuple[tuple[str, object], ...], list[str]] = {}
        for state in self.states:
            if state.answered:
                groups.setdefault(self._identity(state.info), []).append(state.address)
        return groups

    def answering(self) -> bool:
        """Some replica answered the latest read of its Info."""
        return any(state.answered for state in self.states)

    def mismatch(self) -> str:
        """'' when every replica that answered the latest read runs the same model, else what differs where."""
        groups = self._groups()
        if len(groups) < 2:
            return ""
        described = "; ".join(
            f"{', '.join(f'{k}={v}' for k, v in identity)} at {', '.join(addresses)}"
            for identity, addresses in groups.items()
        )
        return (f"the {self.service} replicas run different models ({described}); the gateway does not mix "
                f"replicas of different models: make them the same (finish or roll back the rollout)")

    def agreed_info(self) -> InfoT | None:
        """The Info the replicas that answered the latest read share (when none did: the last one any of them
        answered; a replica that is slow to answer its Info is still the same model); when none ever answered,
        the last Info a call through the balanced channel answered, else None; ServingError when the answering
        ones disagree."""
        problem = self.mismatch()
        if problem:
            raise ServingError(ErrorCode.FAILED_PRECONDITION, problem)
        answered = [s.info for s in self.states if s.answered] or [s.info for s in self.states if s.info is not None]
        return answered[-1] if answered else self._channel_info

    def remember_channel_info(self, info: InfoT) -> None:
        """An Info a replica answered through the balanced channel (which one, grpc knows): the fallback of
        `agreed_info()` until the replicas' own reads have answered (e.g. a replica that came up after the
        gateway, read again at the next round)."""
        self._channel_info = info

    def describe(self) -> dict[str, str]:
        """Each replica address and what it answered, for /ready."""
        out: dict[str, str] = {}
        for state in self.states:
            if state.answered:
                out[state.address] = ", ".join(f"{k}={v}" for k, v in self._identity(state.info))
            else:
                out[state.address] = f"no Info: {state.error or 'not read yet'}"
        return out

    def _log_verdict(self) -> None:
        verdict = self.mismatch()
        if verdict != self._last_verdict:
            if verdict:
                log.error("%s", verdict)
            elif self._last_verdict:
                log.warning("the %s replicas agree again", self.service)
            self._last_verdict = verdict

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._settings.dns_refresh_s)
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:  # never let the watch die; the next round tries again
                log.exception("refreshing the %s replicas failed", self.service)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        channels = [c for c in (self._channel, *self._info_channels.values()) if c is not None]
        await asyncio.gather(*(c.close() for c in channels), *self._closing, return_exceptions=True)
