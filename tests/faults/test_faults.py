"""Faults against the real stack, each service its own process: what the client sees, and recovery.

Every fault is real: SIGKILL of the vision or LLM process mid-request, redis-server stopped and
started, a client that goes away mid-stream, a downstream frozen with SIGSTOP (a slow service: the
gateway's deadline fires), garbage written into a real Redis key. After each one the stack must
serve normally again with the SAME gateway process (never restarted).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time

import grpc
import httpx
import pytest
import redis
from ivl_proto.common.v1 import common_pb2
from ivl_proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ivl_proto.grpc_runtime import message_size_options
from openai import OpenAI
from support.load_client import chat_body, stream_chat, unique_png
from support.service_processes import cpu_seconds, process_backend
from support.waiting import wait_until

pytestmark = pytest.mark.slow

LONG = 4000  # tokens: far more than any test waits for
DEADLINE_S = 4.0  # the gateway's downstream deadlines in this module
_seeds = iter(range(10_000, 20_000))

wait_until = functools.partial(wait_until, step_s=0.1)


@pytest.fixture(scope="module")
def backend(tiny_original):
    with process_backend(
        tiny_original,
        gateway={"default_max_tiles": 2, "vision_timeout_s": DEADLINE_S, "llm_timeout_s": DEADLINE_S,
                 "info_timeout_s": DEADLINE_S / 4},
        llm={"max_concurrency": 1, "max_queue": 0, "context_length": 8192},
    ) as running:
        yield running


@pytest.fixture(autouse=True)
def same_gateway_process(backend):
    """Each fault test starts and ends with the one original gateway process, serving."""
    pid = backend.gateway.pid
    yield
    assert backend.gateway.alive and backend.gateway.pid == pid and backend.gateway.starts == 1


def new_image() -> bytes:
    return unique_png(next(_seeds), 200, 150)


def chat(backend, images: list[bytes] | None = None, text: str = "What is this?", **extra) -> httpx.Response:
    body = chat_body(text, images, max_tokens=4, stream=False, **extra)
    return httpx.post(f"{backend.gateway.http_url}/v1/chat/completions", json=body, timeout=60)


def serves_normally(backend) -> bool:
    """A chat with a new image, then the same image again (a cache hit), both 200."""
    image = new_image()
    first, second = chat(backend, [image]), chat(backend, [image])
    return first.status_code == 200 and second.status_code == 200 and second.json()["ivl"]["cache_hits"] == 1


def grpc_chat(backend, text: str, max_new_tokens: int = 4) -> grpc.RpcError | list[gateway_pb2.ChatResponse]:
    request = gateway_pb2.ChatRequest(
        messages=[gateway_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=[gateway_pb2.ContentPart(text=text)])],
        sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=max_new_tokens),
    )
    with grpc.insecure_channel(backend.gateway.grpc_address, options=message_size_options()) as channel:
        try:
            return list(gateway_pb2_grpc.ChatStub(channel).Chat(request, timeout=30))
        except grpc.RpcError as error:
            return error


def test_stack_serves_before_any_fault(backend):
    assert serves_normally(backend)


def test_vision_killed_mid_request_then_restarted(backend):
    backend.vision.pause()  # the request below is then certainly inside the vision service when it dies
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", chat(backend, [new_image()])))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive(), "the request should be waiting on the frozen vision service"
    killed_at = time.monotonic()
    backend.vision.kill()
    thread.join(DEADLINE_S * 3)
    assert not thread.is_alive()
    assert time.monotonic() - killed_at < DEADLINE_S * 2
    response = result["r"]
    assert response.status_code in (503, 504), response.text
    assert response.json()["error"]["code"] in ("unavailable", "deadline_exceeded")
    assert "vision" in response.json()["error"]["message"]

    # While it is down: image chats get a clear 503 at once, text-only chats still work.
    started = time.monotonic()
    down = chat(backend, [new_image()])
    assert down.status_code == 503 and down.json()["error"]["code"] == "unavailable", down.text
    assert "vision" in down.json()["error"]["message"]
    assert time.monotonic() - started < DEADLINE_S
    assert chat(backend, text="no picture this time").status_code == 200
    wait_until(lambda: backend.gateway.ready()[0] == 503, 5, "/ready to report the vision service down")
    assert backend.gateway.ready()[1]["vision"]["ok"] is False

    backend.vision.start().wait_serving()
    wait_until(lambda: backend.gateway.ready()[0] == 200, 10, "/ready after the vision restart")
    assert serves_normally(backend)


def test_llm_killed_mid_stream_then_restarted(backend):
    body = chat_body("Tell me a very long story.", max_tokens=LONG)
    with httpx.Client(timeout=30) as client, client.stream(
        "POST", f"{backend.gateway.http_url}/v1/chat/completions", json=body
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        seen = [line for _, line in zip(range(8), lines, strict=False)]
        assert any('"content"' in line for line in seen)
        killed_at = time.monotonic()
        backend.llm.kill()
        rest = list(lines)  # the stream must END (not hang) with a clear error event, then [DONE]
    assert time.monotonic() - killed_at < DEADLINE_S * 2
    errors = [line for line in rest if '"error"' in line]
    assert errors and '"unavailable"' in errors[0] and "LLM" in errors[0], rest[-3:]
    assert rest[-1] == "data: [DONE]" or rest[-2] == "data: [DONE]"

    # While it is down: a clear UNAVAILABLE on gRPC and 503 on HTTP, quickly.
    started = time.monotonic()
    error = grpc_chat(backend, "hello?")
    assert isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.UNAVAILABLE
    assert "LLM" in error.details()
    down = chat(backend, text="hello?")
    assert down.status_code == 503 and down.json()["error"]["code"] == "unavailable"
    assert time.monotonic() - started < DEADLINE_S

    backend.llm.start().wait_serving()
    wait_until(lambda: backend.gateway.ready()[0] == 200, 10, "/ready after the LLM restart")
    assert serves_normally(backend)
    replies = grpc_chat(backend, "hello again")
    assert not isinstance(replies, grpc.RpcError) and replies[-1].HasField("final")


def test_redis_stopped_then_started(backend):
    assert backend.redis is not None
    backend.redis.stop()
    image = new_image()
    first, again = chat(backend, [image]), chat(backend, [image])
    assert first.status_code == 200 and again.status_code == 200  # chats never fail for the cache
    assert again.json()["ivl"]["cache_hits"] == 0  # nothing could be stored
    status, ready = backend.gateway.ready()
    assert status == 200 and ready["redis"].startswith("down")
    assert backend.gateway.metric("vision_cache_errors_total", kind="get") >= 1

    backend.redis.start()
    wait_until(lambda: serves_normally(backend), 10, "caching to resume after Redis came back", step_s=0.3)
    assert backend.gateway.ready()[1]["redis"] == "ok"


def test_client_disconnect_mid_stream_stops_generation(backend):
    cancelled_before = backend.gateway.metric("gateway_requests_total", api="http", outcome="cancelled")
    client = OpenAI(base_url=f"{backend.gateway.http_url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Tell me a very long story."}],
        max_tokens=LONG, temperature=0, stream=True,
    )
    chunks = [chunk for _, chunk in zip(range(5), stream, strict=False)]
    assert len(chunks) == 5
    stream.close()  # the client goes away mid-stream
    wait_until(lambda: backend.gateway.metric("gateway_requests_total", api="http", outcome="cancelled")
               > cancelled_before, 3, "the gateway to count the request as cancelled")
    # Generation really stopped: the LLM process stops burning CPU ...
    pid = backend.llm.pid
    time.sleep(0.3)
    before = cpu_seconds(pid)
    time.sleep(1.0)
    assert cpu_seconds(pid) - before < 0.3, "the LLM process is still generating after the client left"
    # ... and its only slot (max_concurrency=1, max_queue=0) is free: a new request is not refused.
    assert chat(backend, text="next one please").status_code == 200


async def test_grpc_client_cancel_frees_the_slot(backend):
    request = gateway_pb2.ChatRequest(
        messages=[gateway_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=[gateway_pb2.ContentPart(text="story")])],
        sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=LONG),
    )
    async with grpc.aio.insecure_channel(backend.gateway.grpc_address, options=message_size_options()) as channel:
        call = gateway_pb2_grpc.ChatStub(channel).Chat(request)
        received = 0
        async for _ in call:
            received += 1
            if received == 4:
                break
        call.cancel()
    await asyncio.sleep(0.5)
    async with httpx.AsyncClient(timeout=30) as client:
        outcome = await stream_chat(client, backend.gateway.http_url, chat_body("after cancel"))
    assert outcome.ok, (outcome.status, outcome.error_code, outcome.error_message)


@pytest.mark.parametrize("service", ["vision", "llm"])
def test_slow_downstream_hits_the_deadline_with_a_clear_504(backend, service):
    target = getattr(backend, service)
    target.pause()  # alive, port open, answers nothing: the slowest possible downstream
    grpc_result: dict[str, object] = {}
    grpc_thread = threading.Thread(target=lambda: grpc_result.setdefault("r", grpc_chat(backend, "are you there?")))
    try:
        if service == "llm":  # the same deadline over gRPC, at the same time
            grpc_thread.start()
        started = time.monotonic()
        response = chat(backend, [new_image()] if service == "vision" else None)
        elapsed = time.monotonic() - started
        if service == "llm":
            grpc_thread.join(DEADLINE_S * 3)
    finally:
        target.resume()
    error = grpc_result.get("r")
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert ("vision" if service == "vision" else "LLM") in response.json()["error"]["message"]
    assert elapsed < DEADLINE_S * 3
    if error is not None:
        assert isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: backend.gateway.ready()[0] == 200, 10, f"/ready after the {service} service resumed")
    # The calls that timed out reach the resumed service already cancelled; its one slot frees at once.
    wait_until(lambda: chat(backend, text="ping").status_code == 200, 5, "a chat after the resume", step_s=0.2)
    assert serves_normally(backend)


def test_corrupted_cache_entry_is_treated_as_a_miss(backend):
    assert backend.redis is not None
    image = new_image()
    assert chat(backend, [image]).json()["ivl"]["cache_hits"] == 0
    assert chat(backend, [image]).json()["ivl"]["cache_hits"] == 1
    corrupt_before = backend.gateway.metric("vision_cache_errors_total", kind="corrupt")
    store = redis.Redis.from_url(backend.redis.url)
    try:
        keys = [k for k in store.scan_iter(match="ivl:emb:*") if not k.endswith(b":tiling")]
        assert keys
        for key in keys:  # every embedding entry, the one of this image included
            value = store.get(key) or b""
            store.set(key, value[: len(value) // 2] + b"garbage" * 10)
        corrupted = chat(backend, [image])
        assert corrupted.status_code == 200, corrupted.text
        assert corrupted.json()["ivl"]["cache_hits"] == 0  # a miss: encoded again, not served from garbage
        assert backend.gateway.metric("vision_cache_errors_total", kind="corrupt") > corrupt_before
        assert chat(backend, [image]).json()["ivl"]["cache_hits"] == 1  # the fresh entry replaced it
    finally:
        store.close()
