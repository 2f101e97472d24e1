"""Cancellation reaches the LLM; dead services give 503/UNAVAILABLE and the gateway recovers by itself;
`python -m ivl_gateway` runs and stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
import pytest
from gateway_helpers import data_url, metric, new_png
from ivl_proto.common.v1 import common_pb2
from ivl_proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ivl_proto.grpc_runtime import message_size_options
from support.redis_server import free_port
from support.waiting import wait_until

LONG = 8000  # tokens: ~10 s of greedy decoding for the tiny model, far longer than the test waits

wait_until = functools.partial(wait_until, step_s=0.02)


def llm_active(stack) -> int:
    return stack.llm_servers[0].service.scheduler.active


def in_flight(stack, api: str) -> float:
    return metric(stack.gateway, "gateway_requests_in_flight", api=api)


def long_body(stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": "Tell me a very long story."}], "max_tokens": LONG,
            "temperature": 0, "stream": stream}


def test_http_stream_disconnect_stops_generation(stack):
    cancelled_before = metric(stack.gateway, "gateway_requests_total", api="http", outcome="cancelled")
    with httpx.Client(timeout=30) as client, client.stream(
        "POST", stack.http_url + "/v1/chat/completions", json=long_body(True)
    ) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert all(line.startswith("data: ") or not line for line in received)
        assert llm_active(stack) == 1
        assert in_flight(stack, "http") == 1
    started = time.monotonic()
    wait_until(lambda: llm_active(stack) == 0, 2.0, "the LLM slot to be freed after the client left")
    assert time.monotonic() - started < 2.0
    wait_until(lambda: in_flight(stack, "http") == 0, 2.0, "gateway_requests_in_flight{api=http} back to 0")
    wait_until(lambda: metric(stack.gateway, "gateway_requests_total", api="http", outcome="cancelled")
               > cancelled_before, 2.0, "the cancelled request to be counted")


def test_http_non_stream_disconnect_stops_generation(stack):
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            httpx.post(stack.http_url + "/v1/chat/completions", json=long_body(False),
                       timeout=httpx.Timeout(30, read=2.0))
        except httpx.ReadTimeout as error:  # the client gives up and closes the connection
            outcome.append(error)

    thread = threading.Thread(target=call)
    thread.start()
    wait_until(lambda: llm_active(stack) == 1, 10, "the generation to start")
    assert in_flight(stack, "http") == 1
    thread.join(30)
    assert outcome, "the request should have timed out on the client side"
    wait_until(lambda: llm_active(stack) == 0, 2.0, "the LLM slot to be freed after the client left")
    wait_until(lambda: in_flight(stack, "http") == 0, 2.0, "gateway_requests_in_flight{api=http} back to 0")


async def test_grpc_cancel_stops_generation(stack):
    request = gateway_pb2.ChatRequest(
        messages=[gateway_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=[gateway_pb2.ContentPart(text="story")])],
        sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=LONG),
    )
    async with grpc.aio.insecure_channel(stack.grpc_address, options=message_size_options()) as channel:
        call = gateway_pb2_grpc.ChatStub(channel).Chat(request)
        seen = 0
        async for _ in call:
            seen += 1
            if seen == 5:
                break
        assert llm_active(stack) == 1
        assert in_flight(stack, "grpc") == 1
        call.cancel()
    wait_until(lambda: llm_active(stack) == 0, 2.0, "the LLM slot to be freed after the gRPC cancel")
    wait_until(lambda: in_flight(stack, "grpc") == 0, 2.0, "gateway_requests_in_flight{api=grpc} back to 0")


def test_http_stream_closed_before_its_body_is_sent_is_not_left_in_flight(stack):
    """The client is gone when the response starts (ASGI send fails): the body's generator never runs,
    yet the chat turn must end at once (not at garbage collection) and leave nothing in flight."""
    body = json.dumps(long_body(True)).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }

    async def call_with_a_broken_send() -> float:
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                assert in_flight(stack, "http") == 1  # the turn is running: its first text is buffered
                raise OSError("the client went away")

        with contextlib.suppress(Exception):
            await stack.gateway.app(scope, receive, send)
        return in_flight(stack, "http")  # read with no await since the app returned

    assert stack.run(call_with_a_broken_send()) == 0
    wait_until(lambda: llm_active(stack) == 0, 2.0, "the LLM slot to be freed")


def chat_with_image(stack, png: bytes) -> httpx.Response:
    return httpx.post(stack.http_url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                                  {"type": "text", "text": "hi"}]}], "max_tokens": 2})


def test_vision_down_gives_503_then_recovers(stack):
    stack.stop_vision(0)
    try:
        response = chat_with_image(stack, new_png())
        assert response.status_code == 503 and "vision" in response.json()["error"]["message"]
        assert httpx.get(stack.http_url + "/ready", timeout=30).status_code == 503
        text_only = httpx.post(stack.http_url + "/v1/chat/completions", timeout=60,
                               json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert text_only.status_code == 200  # the LLM is still there
    finally:
        stack.start_vision(0)  # same port
    wait_until(lambda: chat_with_image(stack, new_png()).status_code == 200, 15, "the gateway to use vision again")
    assert httpx.get(stack.http_url + "/ready", timeout=30).status_code == 200


async def test_llm_down_gives_unavailable_then_recovers(stack):
    request = gateway_pb2.ChatRequest(
        messages=[gateway_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=[gateway_pb2.ContentPart(text="hi")])],
        sampling=common_pb2.SamplingParams(max_new_tokens=2),
    )
    stack.stop_llm(0)
    try:
        async with grpc.aio.insecure_channel(stack.grpc_address, options=message_size_options()) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [e async for e in gateway_pb2_grpc.ChatStub(channel).Chat(request)]
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE and "LLM" in info.value.details()
        response = httpx.post(stack.http_url + "/v1/chat/completions", timeout=60,
                              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable"
    finally:
        stack.start_llm(0)
    wait_until(lambda: httpx.post(stack.http_url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200, 15, "LLM recovery")


def test_python_m_ivl_gateway_serves_and_stops_on_sigterm(stack):
    http_port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "IVL_GATEWAY_VISION_ADDRESSES": ",".join(stack.vision_addresses),
        "IVL_GATEWAY_LLM_ADDRESSES": ",".join(stack.llm_addresses),
        "IVL_GATEWAY_REDIS_URL": stack.redis.url,
        "IVL_GATEWAY_HTTP_PORT": str(http_port), "IVL_GATEWAY_GRPC_PORT": str(grpc_port),
        "IVL_GATEWAY_GRACE_S": "1",
    }
    process = subprocess.Popen([sys.executable, "-m", "ivl_gateway"], env=env, stderr=subprocess.PIPE)
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{http_port}/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                assert process.poll() is None, process.stderr.read().decode()
                return False

        wait_until(ready, 60, "python -m ivl_gateway to be ready")
        response = httpx.post(f"http://127.0.0.1:{http_port}/v1/chat/completions", timeout=60,
                              json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_bad_settings_exit_with_a_clear_message():
    env = {**os.environ, "IVL_GATEWAY_HTTP_PORT": "not-a-port"}
    result = subprocess.run([sys.executable, "-m", "ivl_gateway"], env=env, capture_output=True, timeout=60)
    assert result.returncode == 2 and b"IVL_GATEWAY_HTTP_PORT=not-a-port: not an integer" in result.stderr
