"""Attacks on the public edges of a real gateway process (and the internal ports behind it), one test per
attack class. Each asserts the clear status the attacker gets, that a normal user's request made during
the attack is answered promptly (compared with a baseline measured in the same test: the 2-core machine
is shared), and that every service is still up afterwards.

The backend is real processes on loopback: redis-server, `python -m ivl_vision` and `python -m ivl_llm`
(both requiring an internal token), and `python -m ivl_gateway` with API keys and short edge deadlines;
the rate-limit and budget tests start a second gateway process with their own settings.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ivl_proto.common.v1 import common_pb2
from ivl_proto.gateway.v1 import gateway_pb2
from ivl_proto.internal_auth import TOKEN_METADATA_KEY
from ivl_proto.vision.v1 import vision_pb2, vision_pb2_grpc
from support.edge_attacks import (
    NormalUser,
    RssSampler,
    count_closed,
    fd_count,
    open_idle,
    run_parallel,
    slow_body,
    slow_headers,
    text_plain_post,
)
from support.load_client import chat_body, unique_png
from support.service_processes import ProcessBackend, process_backend, rss_bytes
from support.waiting import wait_until

pytestmark = pytest.mark.slow

TOKEN = "internal-test-token"
KEY = "edge-test-key"
MAX_REQUEST = 8 * 2**20
HEADER_TIMEOUT_S = 2.0
BODY_IDLE_S = 2.0
MAX_CONNECTIONS = 200
GATEWAY = {
    "api_keys": [KEY],
    "internal_token": TOKEN,
    "default_max_tiles": 2,
    "max_request_bytes": MAX_REQUEST,
    "max_inflight_request_bytes": 2 * MAX_REQUEST,
    "http_header_timeout_s": HEADER_TIMEOUT_S,
    "http_body_idle_timeout_s": BODY_IDLE_S,
    "http_min_body_rate_bytes_s": 4096,
    "http_body_rate_grace_s": 2.0,
    "http_max_connections": MAX_CONNECTIONS,
    "redis_max_connections": 4,
    "redis_pool_wait_s": 0.05,
}

wait_for = functools.partial(wait_until, step_s=0.25)


@pytest.fixture(scope="module")
def backend(tiny_original):
    with process_backend(
        tiny_original, gateway=GATEWAY, vision={"auth_token": TOKEN},
        llm={"auth_token": TOKEN, "context_length": 8192, "max_concurrency": 2, "max_queue": 256},
    ) as running:
        yield running


@pytest.fixture(scope="module")
def baseline(backend) -> float:
    """The normal user's latency with no attack (median of 3, after a warm-up)."""
    user = NormalUser(backend.gateway.http_url, KEY)
    user.ask()
    samples = sorted(user.ask() for _ in range(3))
    assert user.statuses == [200] * 4, user.statuses
    return samples[1]


def prompt_limit(baseline: float) -> float:
    """What 'answered promptly' means here: generous, as the machine is shared."""
    return max(5.0, 10 * baseline)


def assert_normal_user_served(user: NormalUser, baseline: float) -> None:
    assert user.during, "the normal user made no request during the attack"
    for latency, status in user.during:
        assert status == 200, user.during
        assert latency < prompt_limit(baseline), f"normal request took {latency:.2f} s (baseline {baseline:.2f} s)"


def assert_all_up(backend: ProcessBackend, *gateways) -> None:
    for service in backend.services:
        assert service.alive, f"{service.name} died:\n{service.log_text()[-2000:]}"
    for address in (backend.vision.address, backend.llm.address):
        with grpc.insecure_channel(address) as channel:  # health needs no token
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, address
    for gateway in (backend.gateway, *gateways):
        status, detail = gateway.ready()
        assert status == 200, detail


def no_tracebacks(log: str) -> None:
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def test_slow_and_half_sent_bodies_are_closed(backend, baseline):
    port = backend.gateway.http_port
    gateway = backend.gateway
    closed_before = {r: gateway.metric("gateway_http_connections_closed_total", reason=r)
                     for r in ("header_timeout", "body_timeout")}
    user = NormalUser(gateway.http_url, KEY)
    with user.asking_during():
        outcomes = {}

        def attack(name, target, *args):
            outcomes[name] = run_parallel(10, target, *args)

        attacks = [
            threading.Thread(target=attack, args=("slow headers", slow_headers, port, 0.5, 20.0)),
            # 100 bytes per second of a 512 KiB body (20 such bodies fit in the budget): under the 4096 B/s minimum after the 2 s grace
            threading.Thread(target=attack, args=("slow body", slow_body, port, 2**19, b" " * 100, 1.0, 20.0,
                                                  None, KEY)),
            # 64 KiB of a 512 KiB body, then silence
            threading.Thread(target=attack, args=("half-sent body", slow_body, port, 2**19, b" " * 65536, 0.2,
                                                  20.0, 1, KEY)),
        ]
        for thread in attacks:
            thread.start()
        for thread in attacks:
            thread.join()
    limit = max(HEADER_TIMEOUT_S, BODY_IDLE_S) + 2.0 + 6.0  # deadline + grace + a loaded machine's slack
    for name, results in outcomes.items():
        for outcome in results:
            assert outcome.status == 408, f"{name}: {outcome.describe()}"
            assert outcome.closed_after_s is not None and outcome.closed_after_s < limit, (name, outcome.describe())
    assert gateway.metric("gateway_http_connections_closed_total", reason="header_timeout") >= (
        closed_before["header_timeout"] + 10)
    assert gateway.metric("gateway_http_connections_closed_total", reason="body_timeout") >= (
        closed_before["body_timeout"] + 20)
    assert_normal_user_served(user, baseline)
    no_tracebacks(gateway.log_text())
    assert_all_up(backend)


def test_client_gone_mid_upload_is_an_info_line(backend):
    gateway = backend.gateway
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", gateway.http_port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000000\r\n\r\n"
                         + b" " * 300_000)
            time.sleep(0.3)
    time.sleep(1.0)
    log = gateway.log_text()
    no_tracebacks(log)
    assert "went away during its upload" in log
    # at most one line per minute for these disconnects (throttled), and the access log shows them as 499
    assert log.count("went away during its upload") < 3
    assert log.count("POST /v1/chat/completions 499") >= 5


def test_many_idle_connections_are_capped(backend, baseline):
    gateway = backend.gateway
    log_before = len(gateway.log_text())
    fds_before = fd_count(gateway.pid)
    user = NormalUser(gateway.http_url, KEY)
    with user.asking_during(every_s=0.3):
        sockets = open_idle(gateway.http_port, 2000)
        try:
            assert len(sockets) == 2000  # accepted (the cap closes idle ones; it does not stop accepting)
            wait_for(lambda: count_closed(sockets) >= 2000 - MAX_CONNECTIONS - 20, 15,
                     "the connections over the cap to be closed")
            held = fd_count(gateway.pid) - fds_before
            assert held <= MAX_CONNECTIONS + 20, f"the gateway holds {held} more fds with 2000 idle sockets"
            wait_for(lambda: count_closed(sockets) == 2000, HEADER_TIMEOUT_S + 15,
                     "the rest to be closed after the header deadline")
        finally:
            for sock in sockets:
                sock.close()
    assert_normal_user_served(user, baseline)
    grpc_ok = health_check(gateway.grpc_address)
    assert grpc_ok, "the gateway's gRPC port stopped answering"
    # no log flood: idle sockets log a few throttled lines, not one per connection
    new_log = gateway.log_text()[log_before:]
    noise = [line for line in new_log.splitlines() if "ivl_gateway.access" not in line]
    assert len(noise) < 20, "\n".join(noise[:40])
    assert gateway.metric("gateway_http_connections_closed_total", reason="evicted_idle") >= 1700
    assert_all_up(backend)


def health_check(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_cross_site_text_plain_post_is_415(backend, baseline):
    gateway = backend.gateway
    chats_before = sum(v for (name, _), v in gateway.metrics().items() if name == "gateway_requests_total")
    response = text_plain_post(gateway.http_url)
    assert response.status_code == 415, response.text
    assert "application/json" in response.json()["error"]["message"]
    assert "access-control-allow-origin" not in response.headers  # CORS is off without an allow-list
    for content_type in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        headers = {"authorization": f"Bearer {KEY}", "content-type": content_type}
        assert httpx.post(f"{gateway.http_url}/v1/chat/completions", content=b"{}", headers=headers,
                          timeout=30).status_code == 415
    chats_after = sum(v for (name, _), v in gateway.metrics().items() if name == "gateway_requests_total")
    assert chats_after == chats_before  # no chat ran
    user = NormalUser(gateway.http_url, KEY)
    assert user.ask() < prompt_limit(baseline) and user.statuses == [200]
    assert_all_up(backend)


def raw_chat_call(address: str, payload: bytes, metadata=(), timeout: float = 60.0) -> grpc.RpcError | list:
    """Chat with raw request bytes (no client-side serialization or size limit)."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(address, options=options) as channel:
        call = channel.unary_stream("/ivl.gateway.v1.Chat/Chat", request_serializer=None,
                                    response_deserializer=None)
        try:
            return list(call(payload, metadata=metadata, timeout=timeout))
        except grpc.RpcError as error:
            return error


def chat_request_bytes(text: str, image: bytes | None = None) -> bytes:
    parts = [gateway_pb2.ContentPart(text=text)]
    if image is not None:
        parts.insert(0, gateway_pb2.ContentPart(image=gateway_pb2.Image(data=image)))
    return gateway_pb2.ChatRequest(
        messages=[gateway_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=parts)],
        sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=2),
    ).SerializeToString()


def test_oversized_grpc_is_refused_before_parsing(backend, baseline):
    gateway = backend.gateway
    size = 100 * 2**20
    payload = chat_request_bytes("x", b"\0" * size)
    user = NormalUser(gateway.http_url, KEY)
    with RssSampler(gateway.pid) as rss, user.asking_during():
        for _ in range(3):
            result = raw_chat_call(gateway.grpc_address, payload, metadata=(("authorization", f"Bearer {KEY}"),))
            assert isinstance(result, grpc.RpcError), "a 100 MiB message was accepted"
            assert result.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, result
            assert "larger than max" in result.details() and str(MAX_REQUEST) in result.details()
    growth = rss.peak - rss.before
    assert growth < size / 4, f"gateway RSS grew by {growth / 2**20:.0f} MiB for a refused 100 MiB message"
    assert_normal_user_served(user, baseline)
    assert_all_up(backend)


def test_keyless_grpc_is_refused_by_the_interceptor(backend, baseline):
    gateway = backend.gateway
    refused_before = gateway.metric("gateway_edge_refusals_total", api="grpc", reason="unauthenticated")
    chats_before = sum(v for (name, _), v in gateway.metrics().items() if name == "gateway_requests_total")
    # Bytes that are not a ChatRequest: parsed, they would be INVALID_ARGUMENT; refused from the metadata
    # alone they are UNAUTHENTICATED.
    for metadata in ((), (("authorization", "Bearer wrong"),), (("x-api-key", "wrong"),)):
        result = raw_chat_call(gateway.grpc_address, b"\xff\xff\xff not a protobuf", metadata=metadata)
        assert isinstance(result, grpc.RpcError) and result.code() is grpc.StatusCode.UNAUTHENTICATED, result
    valid = chat_request_bytes("hi")
    result = raw_chat_call(gateway.grpc_address, valid)
    assert isinstance(result, grpc.RpcError) and result.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "API key" in result.details()
    assert gateway.metric("gateway_edge_refusals_total", api="grpc", reason="unauthenticated") == refused_before + 4
    chats_after = sum(v for (name, _), v in gateway.metrics().items() if name == "gateway_requests_total")
    assert chats_after == chats_before  # the servicer never ran
    answered = raw_chat_call(gateway.grpc_address, valid, metadata=(("authorization", f"Bearer {KEY}"),))
    assert not isinstance(answered, grpc.RpcError) and answered, answered
    user = NormalUser(gateway.http_url, KEY)
    assert user.ask() < prompt_limit(baseline) and user.statuses == [200]
    assert_all_up(backend)


def test_per_client_rate_limit(backend, baseline):
    with backend.extra_gateway(api_keys=["attacker", "normal"], rate_limit="3/minute") as gateway:
        attacker = NormalUser(gateway.http_url, "attacker")
        for _ in range(3):
            attacker.ask()
        assert attacker.statuses == [200, 200, 200]
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        response = httpx.post(f"{gateway.http_url}/v1/chat/completions", json=body, timeout=30,
                              headers={"authorization": "Bearer attacker"})
        assert response.status_code == 429, response.text
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert "3 per 1 minute" in response.json()["error"]["message"]
        result = raw_chat_call(gateway.grpc_address, chat_request_bytes("hi"),
                               metadata=(("authorization", "Bearer attacker"),))
        assert isinstance(result, grpc.RpcError) and result.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(result.trailing_metadata()).get("retry-after")
        # keyless requests are limited per IP (and then refused for the missing key)
        for _ in range(3):
            httpx.post(f"{gateway.http_url}/v1/chat/completions", json=body, timeout=30)
        assert httpx.post(f"{gateway.http_url}/v1/chat/completions", json=body, timeout=30).status_code == 429
        normal = NormalUser(gateway.http_url, "normal")
        assert normal.ask() < prompt_limit(baseline) and normal.statuses == [200]
        assert gateway.metric("gateway_edge_refusals_total", api="http", reason="rate_limited") >= 2
        assert_all_up(backend, gateway)


def test_request_bytes_budget(backend, baseline):
    size = 6 * 2**20  # two of these fit in the 16 MiB budget, a third does not
    with backend.extra_gateway(api_keys=[KEY], max_request_bytes=8 * 2**20, max_inflight_request_bytes=2 * size
                               + 2**20, http_body_idle_timeout_s=60, http_min_body_rate_bytes_s=0) as gateway:
        holders = [socket.create_connection(("127.0.0.1", gateway.http_port)) for _ in range(2)]
        try:
            for sock in holders:  # declared and started, then sent slowly (above the minimum rate)
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Authorization: Bearer " + KEY.encode() + f"\r\nContent-Length: {size}\r\n\r\n".encode()
                             + b" " * 65536)
            time.sleep(0.5)
            assert gateway.metric("gateway_request_bytes_in_flight") == 2 * size
            third = declared_post(gateway.http_port, size)  # refused from its Content-Length, nothing read
            assert third.startswith(b"HTTP/1.1 503 "), third[:200]
            assert b"retry-after: 1\r\n" in third.lower() and b"max_inflight_request_bytes" in third
            with grpc.insecure_channel(gateway.grpc_address, options=[("grpc.max_send_message_length", -1)]) as ch:
                call = ch.unary_stream("/ivl.gateway.v1.Chat/Chat", request_serializer=None,
                                       response_deserializer=None)
                with pytest.raises(grpc.RpcError) as caught:
                    list(call(chat_request_bytes("x", b"\0" * size), timeout=30,
                              metadata=(("authorization", f"Bearer {KEY}"),)))
                assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_inflight_request_bytes" in caught.value.details()
            normal = NormalUser(gateway.http_url, KEY)  # a small request is not held back by the budget
            assert normal.ask() < prompt_limit(baseline) and normal.statuses == [200]
        finally:
            for sock in holders:
                sock.close()
        time.sleep(1.0)
        assert gateway.metric("gateway_request_bytes_in_flight") == 0
        assert gateway.metric("gateway_edge_refusals_total", api="http", reason="budget_full") == 1
        assert_all_up(backend, gateway)


def declared_post(port: int, size: int) -> bytes:
    """Send only the head of a POST declaring `size` bytes; return the response the gateway sends."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + f"\r\nContent-Length: {size}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


async def _hang_up_streams(url: str, body: bytes, count: int) -> None:
    """`count` streaming chats sent at once, each client gone right after its request is out."""

    async def one() -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                     + body)
        await writer.drain()
        writer.close()

    await asyncio.gather(*(one() for _ in range(count)))


def test_redis_pool_burst_is_not_an_outage(backend, baseline):
    import base64
    import json

    gateway = backend.gateway
    image = unique_png(4242, 64, 48)
    user = NormalUser(gateway.http_url, KEY)
    headers = {"authorization": f"Bearer {KEY}"}
    first = httpx.post(f"{gateway.http_url}/v1/chat/completions", json=chat_body("warm", [image], stream=False,
                       max_tokens=2), headers=headers, timeout=120)
    assert first.status_code == 200, first.text
    errors_before = {k: v for k, v in gateway.metrics().items() if k[0] == "vision_cache_errors_total"}
    waits_before = gateway.metric("vision_cache_pool_waits_total")
    log_before = len(gateway.log_text())
    body = json.dumps(chat_body("burst", [image], stream=True, max_tokens=2)).encode()
    assert base64.b64encode(image).decode() in body.decode()
    with user.asking_during():
        asyncio.run(_hang_up_streams(gateway.http_url, body, 200))
        time.sleep(3.0)
    again = httpx.post(f"{gateway.http_url}/v1/chat/completions", json=chat_body("after", [image], stream=False,
                       max_tokens=2), headers=headers, timeout=120)
    assert again.status_code == 200, again.text
    assert again.json()["ivl"]["cache_hits"] == 1  # the cache still hits for a normal request
    errors_after = {k: v for k, v in gateway.metrics().items() if k[0] == "vision_cache_errors_total"}
    assert errors_after == errors_before, (errors_before, errors_after)
    waits = gateway.metric("vision_cache_pool_waits_total")
    assert waits > waits_before, "the burst never waited for a pooled connection: the test proves nothing"
    new_log = gateway.log_text()[log_before:]
    assert "Redis embedding cache unavailable" not in new_log and "Too many connections" not in new_log, new_log[-3000:]
    no_tracebacks(new_log)
    assert_normal_user_served(user, baseline)
    assert_all_up(backend)


def test_internal_services_need_the_token(backend):
    with grpc.insecure_channel(backend.vision.address) as channel:
        stub = vision_pb2_grpc.VisionEncoderStub(channel)
        for metadata in ((), ((TOKEN_METADATA_KEY, "wrong"),)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Info(vision_pb2.InfoRequest(), metadata=metadata, timeout=10)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "only from the gateway" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            stub.EncodeImages(vision_pb2.EncodeImagesRequest(images=[vision_pb2.ImageInput(data=b"x" * 100)]),
                              timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert stub.Info(vision_pb2.InfoRequest(), metadata=((TOKEN_METADATA_KEY, TOKEN),), timeout=10).model_id
    from ivl_proto.llm.v1 import llm_pb2, llm_pb2_grpc

    with grpc.insecure_channel(backend.llm.address) as channel:
        stub = llm_pb2_grpc.LanguageModelStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Info(llm_pb2.InfoRequest(), timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(llm_pb2.GenerateRequest(), timeout=10))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert_all_up(backend)  # health answers without the token; the gateway (with it) is ready


def test_memory_returns_after_a_burst_of_large_bodies(backend):
    """A fresh gateway takes 8 concurrent 7 MiB bodies (all fit its 64 MiB budget): RSS rises by tens of MiB
    while they are parsed, and is back near where it started 2 s later."""
    with backend.extra_gateway(api_keys=[KEY], max_request_bytes=8 * 2**20,
                               max_inflight_request_bytes=64 * 2**20) as gateway:
        NormalUser(gateway.http_url, KEY).ask()
        steady_before = rss_bytes(gateway.pid)
        body = b'{"messages": [{"role": "user", "content": "' + b"a" * (7 * 2**20) + b'"}], "max_tokens": 2}'
        headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}

        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=120) as client:
                responses = await asyncio.gather(*(client.post(f"{gateway.http_url}/v1/chat/completions",
                                                               content=body, headers=headers) for _ in range(8)))
            return [r.status_code for r in responses]

        with RssSampler(gateway.pid) as rss:
            statuses = asyncio.run(burst())
        assert set(statuses) == {400}, statuses  # the text is over max_text_chars
        time.sleep(2.0)
        after = rss_bytes(gateway.pid)
        mib = 2**20
        assert rss.peak - steady_before > 30 * mib, "the burst did not cost memory: the test proves nothing"
        assert after - steady_before < 30 * mib, (
            f"RSS {steady_before / mib:.0f} MiB -> peak {rss.peak / mib:.0f} -> {after / mib:.0f} MiB after")
