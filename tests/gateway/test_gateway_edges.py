"""The gateway's edge settings on an in-process stack: what /metrics, /docs and reflection expose, CORS with
and without an allow-list, request ids and the access log, the internal token towards the services, the
small helpers (log throttle, byte budget, rate limit). The attacks themselves: tests/hostile/test_hostile_edges.py."""

from __future__ import annotations

import logging

import grpc
import httpx
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ivl_gateway.log_throttle import LogThrottle, ThrottleFilter
from ivl_gateway.rate_limit import ClientRateLimit, RateLimited
from ivl_gateway.request_budget import SMALL_REQUEST_BYTES, BudgetFull, ByteBudget
from ivl_proto.internal_auth import TOKEN_METADATA_KEY
from ivl_proto.vision.v1 import vision_pb2, vision_pb2_grpc
from support.stack import running_stack

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def list_services(address: str, metadata=()) -> list[str] | grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        try:
            replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                     metadata=metadata, timeout=10))
        except grpc.RpcError as error:
            return error
    return [s.name for s in replies[0].list_services_response.service]


def test_metrics_docs_and_reflection_behind_the_key_or_off(stack):
    with stack.extra_gateway(api_keys=["k1"], metrics_access="api_key", docs_access="off",
                             reflection_access="api_key") as gateway:
        base = f"http://127.0.0.1:{gateway.ports.http}"
        assert httpx.get(f"{base}/metrics", timeout=10).status_code == 401
        assert "gateway_requests_total" in httpx.get(f"{base}/metrics", headers={"authorization": "Bearer k1"},
                                                     timeout=10).text
        for path in ("/docs", "/openapi.json"):
            assert httpx.get(f"{base}{path}", headers={"authorization": "Bearer k1"}, timeout=10).status_code == 404
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # liveness stays open
        address = f"127.0.0.1:{gateway.ports.grpc}"
        refused = list_services(address)
        assert isinstance(refused, grpc.RpcError) and refused.code() is grpc.StatusCode.UNAUTHENTICATED
        assert "ivl.gateway.v1.Chat" in list_services(address, (("authorization", "Bearer k1"),))
    with stack.extra_gateway(reflection_access="off") as gateway:
        off = list_services(f"127.0.0.1:{gateway.ports.grpc}")
        assert isinstance(off, grpc.RpcError) and off.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "ivl.gateway.v1.Chat" in list_services(stack.grpc_address)  # the default: open


def test_cors_is_off_unless_an_allow_list_is_set(stack):
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                 "access-control-request-headers": "content-type,authorization"}
    url = f"{stack.http_url}/v1/chat/completions"
    response = httpx.options(url, headers=preflight, timeout=10)
    assert "access-control-allow-origin" not in response.headers
    with stack.extra_gateway(cors_allow_origins=["https://app.example"]) as gateway:
        url = f"http://127.0.0.1:{gateway.ports.http}/v1/chat/completions"
        allowed = httpx.options(url, headers=preflight, timeout=10)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(url, headers={**preflight, "origin": "https://evil.example"}, timeout=10)
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
        posted = httpx.post(url, json=CHAT, headers={"origin": "https://app.example"}, timeout=60)
        assert posted.status_code == 200 and posted.headers["access-control-allow-origin"] == "https://app.example"
        # an allow-listed origin still cannot send a form or text/plain body
        assert httpx.post(url, content=b"{}", headers={"content-type": "text/plain", "origin": "https://app.example"},
                          timeout=10).status_code == 415


def test_request_ids_and_one_access_log_line_per_request(stack, caplog):
    with caplog.at_level(logging.INFO, logger="ivl_gateway.access"):
        response = httpx.post(f"{stack.http_url}/v1/chat/completions", json=CHAT,
                              headers={"x-request-id": "my-trace-42"}, timeout=60)
        generated = httpx.get(f"{stack.http_url}/health", headers={"x-request-id": "bad id with spaces"}, timeout=10)
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "my-trace-42"
    assert response.json()["id"] == "chatcmpl-my-trace-42"
    assert generated.headers["x-request-id"] != "bad id with spaces" and len(generated.headers["x-request-id"]) == 24
    lines = [r.getMessage() for r in caplog.records if r.name == "ivl_gateway.access"]
    chat = [line for line in lines if "id=my-trace-42" in line]
    assert len(chat) == 1, lines
    assert chat[0].startswith("POST /v1/chat/completions 200 in=") and "client=127.0.0.1" in chat[0]
    assert "ms " in chat[0] and f"out={len(response.content)}" in chat[0]


def test_the_gateway_calls_token_protected_services(tiny_original):
    with running_stack(tiny_original, redis=False, gateway={"internal_token": "t0k3n", "default_max_tiles": 1},
                       vision={"auth_token": "t0k3n"}, llm={"auth_token": "t0k3n", "context_length": 4096}) as guarded:
        response = httpx.post(f"{guarded.http_url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _png_url()}}, {"type": "text", "text": "hi"}]}],
            "max_tokens": 2})
        assert response.status_code == 200, response.text
        with grpc.insecure_channel(guarded.vision_addresses[0]) as channel:
            stub = vision_pb2_grpc.VisionEncoderStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Info(vision_pb2.InfoRequest(), timeout=10)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert stub.Info(vision_pb2.InfoRequest(), metadata=((TOKEN_METADATA_KEY, "t0k3n"),), timeout=10)
        with guarded.extra_gateway(internal_token="wrong") as wrong:
            ready = httpx.get(f"http://127.0.0.1:{wrong.ports.http}/ready", timeout=30)
            assert ready.status_code == 503 and "only from the gateway" in ready.text


def _png_url() -> str:
    from gateway_helpers import data_url, new_png

    return data_url(new_png(64, 48))


def test_log_throttle_folds_repeats(caplog):
    throttle = LogThrottle(interval_s=60)
    log = logging.getLogger("test.throttle")
    with caplog.at_level(logging.WARNING, logger="test.throttle"):
        for now in (0.0, 1.0, 2.0, 3.0):
            allowed, _ = throttle.admit("k", now)
            if allowed:
                log.warning("first")
        assert throttle.admit("k", 61.0) == (True, 3)
        assert throttle.admit("other", 61.0) == (True, 0)
        flt = ThrottleFilter(LogThrottle(interval_s=60))
        records = [logging.LogRecord("uvicorn.error", logging.WARNING, "", 0, "Invalid HTTP request received.",
                                     None, None) for _ in range(50)]
        assert sum(flt.filter(r) for r in records) == 1
    assert [r.getMessage() for r in caplog.records] == ["first"]


def test_byte_budget_and_rate_limit_units():
    budget = ByteBudget(10 * SMALL_REQUEST_BYTES)
    assert not budget.counts(SMALL_REQUEST_BYTES) and budget.counts(SMALL_REQUEST_BYTES + 1)
    budget.take(6 * SMALL_REQUEST_BYTES)
    with pytest.raises(BudgetFull) as caught:
        budget.take(5 * SMALL_REQUEST_BYTES)
    assert caught.value.http_status == 503 and "max_inflight_request_bytes" in caught.value.message
    budget.give_back(6 * SMALL_REQUEST_BYTES)
    assert budget.in_use == 0 and budget.try_take(10 * SMALL_REQUEST_BYTES)
    limit = ClientRateLimit("2/minute;100/hour")
    limit.check("ip:1")
    limit.check("ip:1")
    with pytest.raises(RateLimited) as limited:
        limit.check("ip:1")
    assert limited.value.http_status == 429 and 1 <= limited.value.retry_after_s <= 60
    limit.check("ip:2")  # another client has its own budget
    assert not ClientRateLimit("").enabled


def test_keep_alive_reuse_limit(stack):
    with stack.extra_gateway(http_max_requests_per_connection=3) as gateway, httpx.Client(timeout=10) as client:
        url = f"http://127.0.0.1:{gateway.ports.http}/health"
        replies = [client.get(url) for _ in range(4)]
    assert [r.status_code for r in replies] == [200] * 4
    assert [r.headers.get("connection") for r in replies] == [None, None, "close", None]  # 4th: a new connection


def test_http_connections_send_without_nagle(stack):
    """Every accepted HTTP connection has TCP_NODELAY: with Nagle on, a kept-alive response of more than one
    write (head + body, each SSE chunk) waited ~40 ms for the client's delayed ACK (the listening socket was
    made with proto 0, and asyncio turns Nagle off only for sockets whose proto says TCP)."""
    import socket

    guard = stack.gateway.guard
    with httpx.Client(timeout=10) as client:
        replies = [client.get(f"{stack.http_url}/health") for _ in range(2)]  # the second one on the kept-alive one
        assert [r.status_code for r in replies] == [200, 200]
        sockets = [conn.transport.get_extra_info("socket") for conn in guard.connections()]
        assert sockets
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets), sockets
