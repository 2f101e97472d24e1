"""Lifecycle of the real vision server: health while loading, SERVING, graceful stop, `python -m ivl_vision`."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.vision.v1 import vision_pb2, vision_pb2_grpc
from ivl_vision.server import load_encoder
from support.vision_server import running_vision_server

SERVICE = "ivl.vision.v1.VisionEncoder"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return response.status


async def test_not_serving_while_loading_then_serving(tiny_original, make_png):
    release = threading.Event()
    loads: list[str] = []

    def slow_load(settings, device, dtype):
        loads.append(device)
        if not release.wait(60):
            raise TimeoutError("the test never released the loader")
        return load_encoder(settings, device, dtype)

    async with (
        running_vision_server(tiny_original, load=slow_load, wait_ready=False) as (address, server),
        grpc.aio.insecure_channel(address, options=message_size_options()) as channel,
    ):
        assert await health_of(channel) == NOT_SERVING
        assert await health_of(channel, SERVICE) == NOT_SERVING
        stub = vision_pb2_grpc.VisionEncoderStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Info(vision_pb2.InfoRequest())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "still loading" in caught.value.details()
        release.set()
        await server.wait_ready(60)
        assert await health_of(channel) == SERVING
        assert await health_of(channel, SERVICE) == SERVING
        request = vision_pb2.EncodeImagesRequest(images=[vision_pb2.ImageInput(data=make_png(64, 64))])
        response = await stub.EncodeImages(request)
        assert response.images[0].plan.num_tiles == 1
    assert loads == ["cpu"]


async def test_failed_load_stays_not_serving(tiny_original):
    def broken_load(settings, device, dtype):
        raise OSError("weights are unreadable")

    async with running_vision_server(tiny_original, load=broken_load, wait_ready=False) as (address, server):
        with pytest.raises(OSError, match="unreadable"):
            await server.wait_ready(30)
        async with grpc.aio.insecure_channel(address) as channel:
            assert await health_of(channel) == NOT_SERVING


async def test_graceful_stop_finishes_in_flight_calls(tiny_original, make_png):
    # a 1.5 s batching window keeps the call in flight while stop() begins
    async with (
        running_vision_server(tiny_original, batch_wait_ms=1500, max_batch_tiles=64) as (address, server),
        grpc.aio.insecure_channel(address, options=message_size_options()) as channel,
    ):
        stub = vision_pb2_grpc.VisionEncoderStub(channel)
        request = vision_pb2.EncodeImagesRequest(images=[vision_pb2.ImageInput(data=make_png(64, 64))])
        in_flight = asyncio.ensure_future(stub.EncodeImages(request, timeout=30))
        while server.service.batcher.queued_tiles == 0:
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(server.stop(5.0))
        await asyncio.sleep(0.2)
        assert not in_flight.done() and not stopping.done()  # draining: the call is still waiting
        response = await in_flight
        await stopping
        assert response.images[0].embedding.shape[0] == 256
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Info(vision_pb2.InfoRequest(), timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def _wait_for_port(process: subprocess.Popen, lines: list[str], timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if found:
            return int(found.group(1))
    raise AssertionError("the server never said where it listens:\n" + "".join(lines))


def test_python_m_ivl_vision_serves_health_and_stops_on_sigterm(tiny_original):
    env = {**os.environ, "IVL_VISION_MODEL_PATH": str(tiny_original), "IVL_VISION_PORT": "0",
           "IVL_VISION_TORCH_THREADS": "1", "IVL_VISION_GRACE_S": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "ivl_vision"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    lines: list[str] = []
    try:
        port = _wait_for_port(process, lines, 60)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 60
            status = NOT_SERVING
            while time.monotonic() < deadline and status != SERVING:
                status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status
                time.sleep(0.05)
            assert status == SERVING
            info = vision_pb2_grpc.VisionEncoderStub(channel).Info(vision_pb2.InfoRequest(), timeout=5)
            assert info.tokens_per_tile == 256
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    rest = process.stderr.read()
    assert "stop signal received" in "".join(lines) + rest


def test_python_m_ivl_vision_rejects_bad_settings_clearly(tiny_original):
    env = {**os.environ, "IVL_VISION_MODEL_PATH": str(tiny_original), "IVL_VISION_MAX_BATCH_TILES": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "ivl_vision"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "IVL_VISION_MAX_BATCH_TILES" in result.stderr and "greater than or equal to 1" in result.stderr
