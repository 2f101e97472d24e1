"""A pool of downstream replicas: one channel each, health-aware round robin per request.

Targets are "host:port" entries or "dns:NAME:PORT" (re-resolved every `dns_refresh_s`, one replica per
address). A background task checks grpc.health.v1 of every replica; a call that fails with UNAVAILABLE
marks its replica down for `replica_backoff_s` and moves on to the next one. When every replica is
down, calls still try them (so the pool recovers on its own as soon as a service is back); a replica
that went away is dialled again at least every max(health_interval_s, replica_backoff_s).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ivl_proto.errors import ErrorCode, ServingError, from_grpc_error
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.internal_auth import token_client_interceptors

log = logging.getLogger(__name__)


def channel_options(max_bytes: int, redial_s: float) -> list[tuple[str, int]]:
    """Message sizes, and a reconnect backoff capped at redial_s: gRPC's own grows to 120 s, so a
    service that comes back after a long outage would wait up to two minutes to be dialled again."""
    redial_ms = max(250, int(redial_s * 1000))
    return [
        *message_size_options(max_bytes),
        ("grpc.initial_reconnect_backoff_ms", min(1000, redial_ms)),
        ("grpc.max_reconnect_backoff_ms", redial_ms),
    ]


class Replica:
    """One downstream address with its channel, stub and health state."""

    def __init__(
        self, address: str, stub_factory: Callable[[grpc.aio.Channel], Any], max_bytes: int, token: str = "",
        redial_s: float = 2.0,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=channel_options(max_bytes, redial_s),
                                                 interceptors=[*token_client_interceptors(token), *interceptors] or None)
        self.stub = stub_factory(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.healthy = True
        self.down_until = 0.0
        self.info: Any = None  # the replica's last Info response (set by the clients)

    def usable(self, now: float) -> bool:
        return self.healthy and now >= self.down_until

    async def close(self) -> None:
        await self.channel.close()


async def _resolve(target: str) -> list[str]:
    if not target.startswith("dns:"):
        return [target]
    name, _, port = target[4:].lstrip("/").rpartition(":")
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
    except OSError as error:
        log.warning("could not resolve %s: %s", target, error)
        return []
    addresses = []
    for family, _, _, _, sockaddr in infos:
        host = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]
        addresses.append(f"{host}:{sockaddr[1]}")
    return sorted(set(addresses))


class ReplicaPool:
    def __init__(
        self,
        service: str,
        targets: list[str],
        stub_factory: Callable[[grpc.aio.Channel], Any],
        *,
        health_interval_s: float,
        backoff_s: float,
        dns_refresh_s: float,
        max_message_bytes: int,
        on_change: Callable[[Replica], Any] | None = None,
        token: str = "",
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        self.service = service
        self._targets = targets
        self._stub_factory = stub_factory
        self._health_interval_s = health_interval_s
        self._backoff_s = backoff_s
        self._dns_refresh_s = dns_refresh_s
        self._max_bytes = max_message_bytes
        self._on_change = on_change
        self._token = token  # internal token sent to every replica (their auth_token)
        self._interceptors = tuple(interceptors)  # request id + trace context metadata on every call
        self._replicas: dict[str, Replica] = {}
        self._counters: dict[str, itertools.count[int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._last_resolve = 0.0

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    async def start(self) -> None:
        await self._refresh_addresses()
        self._task = asyncio.create_task(self._monitor(), name=f"{self.service}-health")

    async def _refresh_addresses(self) -> None:
        wanted: list[str] = []
        for target in self._targets:
            wanted.extend(await _resolve(target))
        for address in wanted:
            if address not in self._replicas:
                self._replicas[address] = Replica(
                    address, self._stub_factory, self._max_bytes, self._token,
                    max(self._health_interval_s, self._backoff_s), self._interceptors,
                )
        for address in [a for a in self._replicas if a not in wanted]:
            if any(t.startswith("dns:") for t in self._targets):
                await self._replicas.pop(address).close()
        self._last_resolve = time.monotonic()

    def ordered(self, method: str = "") -> list[Replica]:
        """All replicas for one call: round robin start (one rotation per method, so that a request's
        PlanImages and EncodeImages calls don't lock into alternating replicas), usable ones first."""
        replicas = self.replicas
        if not replicas:
            return []
        counter = self._counters.setdefault(method, itertools.count())
        start = next(counter) % len(replicas)
        rotated = replicas[start:] + replicas[:start]
        now = time.monotonic()
        return [r for r in rotated if r.usable(now)] + [r for r in rotated if not r.usable(now)]

    def mark_down(self, replica: Replica, reason: str) -> None:
        if replica.healthy:
            log.warning("%s replica %s is down: %s", self.service, replica.address, reason)
        replica.healthy = False
        replica.down_until = time.monotonic() + self._backoff_s

    def mark_up(self, replica: Replica) -> None:
        if not replica.healthy:
            log.info("%s replica %s is back", self.service, replica.address)
        replica.healthy = True
        replica.down_until = 0.0

    async def check(self, replica: Replica) -> bool:
        try:
            reply = await replica.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
        except grpc.RpcError as error:
            self.mark_down(replica, f"health check failed: {error.code().name}")
            return False
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            self.mark_down(replica, "health says NOT_SERVING")
            return False
        was_down = not replica.healthy or replica.info is None
        self.mark_up(replica)
        if was_down and self._on_change is not None:
            with contextlib.suppress(Exception):
                await self._on_change(replica)
        return True

    async def _monitor(self) -> None:
        while True:
            if any(t.startswith("dns:") for t in self._targets) and (
                time.monotonic() - self._last_resolve >= self._dns_refresh_s
            ):
                await self._refresh_addresses()
            await asyncio.gather(*(self.check(r) for r in self.replicas), return_exceptions=True)
            await asyncio.sleep(self._health_interval_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for replica in self.replicas:
            await replica.close()


async def call_unary(pool: ReplicaPool, method: str, request: Any, timeout: float) -> tuple[Any, Replica]:
    """Call `method` on the next usable replica; UNAVAILABLE moves on to the next one."""
    tried: list[str] = []
    for replica in pool.ordered(method):
        try:
            response = await getattr(replica.stub, method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.UNAVAILABLE:
                pool.mark_down(replica, error.details() or "unavailable")
                tried.append(f"{replica.address}: {error.details()}")
                continue
            raise from_grpc_error(error, pool.service) from error
        pool.mark_up(replica)
        return response, replica
    raise no_replica_error(pool, tried)


def no_replica_error(pool: ReplicaPool, tried: list[str]) -> ServingError:
    if not tried:
        return ServingError(ErrorCode.UNAVAILABLE, f"the {pool.service} service has no replica address")
    return ServingError(
        ErrorCode.UNAVAILABLE,
        f"the {pool.service} service is unavailable ({len(tried)} replica(s) tried: {'; '.join(tried)})",
    )
