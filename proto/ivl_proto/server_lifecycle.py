"""The one lifecycle of every gRPC server of the stack (vision, LLM, gateway): bind, start, health, drain, stop.

    server = build_server(settings)   # a ServerLifecycle subclass: servicers registered, nothing bound
    port = server.bind()              # optional: bind early (0 = a free port); start() binds otherwise
    await server.start()              # answering; grpc.health.v1 NOT_SERVING; the model loads behind it
    await server.wait_ready(timeout_s)  # loaded (and warmed): health SERVING; re-raises a load failure
    await server.drain(grace_s)       # health NOT_SERVING, in-flight calls get grace_s, the gRPC server stops
    await server.stop(grace_s)        # drain + release the model and the side listeners; idempotent

`grace_s=None` everywhere means the service's own `grace_s` setting. `run_until_signal(server)` is what
`python -m <service>` runs: start, wait for the load or SIGTERM/SIGINT, drain and stop.
A subclass provides `_load()` (the model; the gateway has none) and may extend `_after_start()` (side
listeners: metrics, the gateway's HTTP) and `_release()` (pools, backends, channels).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health

from ivl_proto.errors import ServingError
from ivl_proto.grpc_runtime import bind, set_serving, wait_for_stop_signal

log = logging.getLogger(__name__)

_ANY_HOST = ("0.0.0.0", "", "[::]", "::")


class ServerLifecycle:
    """A grpc.aio server with its health servicer and the lifecycle above. `self.port` is the bound port."""

    def __init__(
        self,
        name: str,
        grpc_server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        service_names: Sequence[str],
        host: str,
        port: int,
        grace_s: float,
    ) -> None:
        self.name = name  # for log lines: "vision encoder", "LLM", "gateway"
        self.grpc_server = grpc_server
        self.health = health_servicer
        self.service_names = list(service_names)
        self.host = host
        self.requested_port = port
        self.grace_s = grace_s
        self.port: int | None = None
        self.loading: asyncio.Task[None] | None = None
        self.stopped = False
        self._stop_lock = asyncio.Lock()

    @property
    def address(self) -> str:
        """host:port to dial this server at (loopback when it listens on every interface)."""
        if self.port is None:
            raise RuntimeError(f"the {self.name} server is not bound; call start() first")
        return f"{'127.0.0.1' if self.host in _ANY_HOST else self.host}:{self.port}"

    def bind(self) -> int:
        """Bind the gRPC port once (0 picks a free one) and return it."""
        if self.port is None:
            self.port = bind(self.grpc_server, self.host, self.requested_port)
        return self.port

    async def start(self) -> int:
        """Bind if not yet, start answering with health NOT_SERVING, begin loading; return the gRPC port."""
        if self.loading is not None:
            raise RuntimeError(f"the {self.name} server is already started")
        port = self.bind()
        await self.set_health(False)
        await self.grpc_server.start()
        try:
            await self._after_start()
        except BaseException:
            await self.grpc_server.stop(0)
            raise
        self.loading = asyncio.get_running_loop().create_task(self._load_then_serve(), name=f"ivl-{self.name.replace(' ', '-')}-load")
        return port

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Return once loaded and SERVING; raises what loading raised (TimeoutError after timeout_s)."""
        if self.loading is None:
            raise RuntimeError(f"start() the {self.name} server first")
        await asyncio.wait_for(asyncio.shield(self.loading), timeout_s)

    async def set_health(self, serving: bool) -> None:
        """grpc.health.v1 of the whole server ("") and of each service: SERVING or NOT_SERVING."""
        await set_serving(self.health, self.service_names, serving)

    async def drain(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING for good (balancers stop sending), then in-flight calls get grace_s to finish
        before the gRPC server stops."""
        await self.health.enter_graceful_shutdown()
        await self.grpc_server.stop(self.grace_s if grace_s is None else grace_s)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop loading, drain, release what the server holds; a second call returns at once."""
        async with self._stop_lock:
            if self.stopped:
                return
            self.stopped = True
            if self.loading is not None and not self.loading.done():
                self.loading.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.loading
            await self.drain(grace_s)
            await self._release()
            log.info("%s server stopped", self.name)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()

    async def _load_then_serve(self) -> None:
        await self._load()
        if not self.stopped:
            await self.set_health(True)

    async def _after_start(self) -> None:
        """Side listeners once the gRPC port answers (metrics, HTTP); nothing by default."""

    async def _load(self) -> None:
        """Load (and warm) what the server serves; nothing by default."""

    async def _release(self) -> None:
        """Free what the server holds after the drain; nothing by default."""


async def run_until_signal(server: ServerLifecycle) -> None:
    """`python -m <service>`: start, then wait for SIGTERM/SIGINT; a failed load stops the server and re-raises.
    On the signal: drain for the server's grace_s and stop."""
    stop_signal = asyncio.create_task(wait_for_stop_signal())
    await asyncio.sleep(0)  # the signal handlers are installed before loading starts
    try:
        await server.start()
        ready = asyncio.create_task(server.wait_ready())
        await asyncio.wait({stop_signal, ready}, return_when=asyncio.FIRST_COMPLETED)
        error = ready.exception() if ready.done() else None
        if error is not None:
            await server.stop(0)
            if isinstance(error, ServingError):
                raise error
            raise RuntimeError(f"the {server.name} server could not load: {error}") from error
        await stop_signal
        log.info("stop signal received; stopping the %s server (draining for up to %.1f s)", server.name, server.grace_s)
        ready.cancel()
    finally:
        stop_signal.cancel()
        await server.stop()
