"""The one server lifecycle (ivl_proto.server_lifecycle) on a real grpc.aio server on loopback: bind, start
with health NOT_SERVING, SERVING after the load, a load failure, drain and an idempotent stop; and the three
servers of the stack are built on it with the same signatures."""

from __future__ import annotations

import asyncio
import inspect

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ivl_proto.grpc_runtime import add_health_and_reflection, new_aio_server
from ivl_proto.server_lifecycle import ServerLifecycle, run_until_signal

SERVICE = "ivl.test.v1.Nothing"


class HeldServer(ServerLifecycle):
    def __init__(self, fail: bool = False) -> None:
        server = new_aio_server()
        health = add_health_and_reflection(server, [SERVICE])
        super().__init__("test", server, health, [SERVICE], "127.0.0.1", 0, grace_s=0.5)
        self.release = asyncio.Event()
        self.fail = fail
        self.released = 0

    async def _load(self) -> None:
        await self.release.wait()
        if self.fail:
            raise OSError("weights are unreadable")

    async def _release(self) -> None:
        self.released += 1


async def _status(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return reply.status


async def test_bind_start_serving_drain_stop():
    server = HeldServer()
    port = server.bind()
    assert port > 0 and server.bind() == port and server.address == f"127.0.0.1:{port}"
    assert await server.start() == port
    with pytest.raises(RuntimeError, match="already started"):
        await server.start()
    for name in ("", SERVICE):
        assert await _status(server.address, name) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(TimeoutError):
        await server.wait_ready(0.2)
    server.release.set()
    await server.wait_ready(5)
    assert await _status(server.address) == health_pb2.HealthCheckResponse.SERVING
    await asyncio.gather(server.stop(0), server.stop(0))
    assert server.released == 1 and server.stopped
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _status(server.address)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_failed_load_stays_not_serving_and_run_until_signal_raises_it():
    server = HeldServer(fail=True)
    await server.start()
    server.release.set()
    with pytest.raises(OSError, match="unreadable"):
        await server.wait_ready(5)
    assert await _status(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING
    await server.stop(0)

    failing = HeldServer(fail=True)
    failing.release.set()
    with pytest.raises(RuntimeError, match="the test server could not load: weights are unreadable"):
        await asyncio.wait_for(run_until_signal(failing), 10)
    assert failing.stopped and failing.released == 1


async def test_stop_while_loading_cancels_the_load():
    server = HeldServer()
    await server.start()
    await server.stop(0)
    assert server.loading is not None and server.loading.cancelled()
    assert server.released == 1


def test_the_three_servers_share_it_with_the_same_signatures():
    from ivl_gateway.server import Gateway
    from ivl_llm.server import LLMServer
    from ivl_vision.server import VisionServer

    for cls in (VisionServer, LLMServer, Gateway):
        assert issubclass(cls, ServerLifecycle)
        for method in ("bind", "start", "wait_ready", "set_health", "drain", "stop"):
            assert inspect.signature(getattr(cls, method)) == inspect.signature(getattr(ServerLifecycle, method)), (
                cls, method)
        for method in ("bind", "start", "wait_ready", "set_health", "stop"):  # only the hooks (and the gateway's drain)
            assert getattr(cls, method) is getattr(ServerLifecycle, method), (cls, method)
