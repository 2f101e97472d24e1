"""Replicas of different models are never mixed: the gateway reads every replica's Info, refuses image chats
while the vision replicas disagree on their fingerprint (409, naming the replicas), says so in /ready, and
serves again once they agree. Real vision services: the second one runs the same checkpoint in bfloat16,
which is another fingerprint (the compute dtype is part of it)."""

from __future__ import annotations

import contextlib
import functools
import time

import httpx
from gateway_helpers import data_url, new_png
from support.redis_server import free_port
from support.vision_server import vision_server_in_thread
from support.waiting import wait_until

wait_until = functools.partial(wait_until, step_s=0.2)


def image_chat(port: int) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(new_png(300, 200))}}, {"type": "text", "text": "?"}]}],
        "max_tokens": 1}
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)


def text_chat(port: int) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)


def ready(port: int) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=30)


def test_vision_replicas_of_different_models_are_refused_until_they_agree(stack, tiny_original):
    with contextlib.ExitStack() as odd_stack:
        odd, _ = odd_stack.enter_context(vision_server_in_thread(tiny_original, dtype="bfloat16", warmup=False))
        with stack.extra_gateway(vision_addresses=[stack.vision_addresses[0], odd], dns_refresh_s=0.5) as gateway:
            port = gateway.ports.http
            answer = ready(port)
            assert answer.status_code == 503
            message = answer.json()["vision"]["error"]
            assert "different models" in message and stack.vision_addresses[0] in message and odd in message
            refused = image_chat(port)
            assert refused.status_code == 409, refused.text
            assert "different models" in refused.json()["error"]["message"]
            assert text_chat(port).status_code == 200  # chats without images do not need the vision model

            odd_stack.close()  # the odd replica goes away: the rest agree again
            wait_until(lambda: ready(port).status_code == 200, 30, "/ready once the replicas agree")
            assert "no Info" in ready(port).json()["vision"]["replicas"][odd]
            assert image_chat(port).status_code == 200


def test_a_replica_answering_with_another_fingerprint_is_not_mixed_in(stack, tiny_original):
    """The odd replica starts after the gateway read every Info (and the next read is far away): the first
    encode it answers has another fingerprint; that request is refused (409), not mixed, and the gateway
    checks the replicas again at once, finds the mismatch and says so."""
    odd_port = free_port()
    odd = f"127.0.0.1:{odd_port}"
    with stack.extra_gateway(vision_addresses=[stack.vision_addresses[0], odd], dns_refresh_s=3600) as gateway:
        port = gateway.ports.http
        assert image_chat(port).status_code == 200  # only the first replica is up
        with vision_server_in_thread(tiny_original, port=odd_port, dtype="bfloat16", warmup=False):
            statuses = []
            for _ in range(8):  # round robin reaches the odd replica once grpc's health check has seen it
                statuses.append(image_chat(port).status_code)
                if statuses[-1] == 409:
                    break
                time.sleep(0.3)
            assert statuses[-1] == 409, statuses
            # no periodic read comes for an hour: what follows is the immediate re-check's doing
            wait_until(lambda: "different models" in image_chat(port).json().get("error", {}).get("message", ""),
                       15, "the immediate re-check to find the mismatch")
            assert ready(port).status_code == 503


def test_a_replica_that_starts_after_the_gateway_is_read_at_the_next_round(stack, tiny_original):
    """The gateway starts while its vision replica refuses connections (as when a whole stack starts at once).
    Its Info channel redials within REPLICA_BACKOFF_S, not grpc's default backoff that grows towards 120 s, so
    the replica's own Info is read at the next round after it comes up: chats then rely on it, not on an Info
    call through the balanced channel (which a frozen replica would answer with a 504 after INFO_TIMEOUT_S)."""
    late_port = free_port()
    late = f"127.0.0.1:{late_port}"
    with stack.extra_gateway(vision_addresses=[late], dns_refresh_s=0.5, replica_backoff_s=0.2) as gateway:
        port = gateway.ports.http
        # Refused for 30 s: grpc's default backoff (1 s x 1.6 per failure, +-20 %) dials at ~27 s, then ~44 s.
        time.sleep(30)
        assert "no Info" in ready(port).json()["vision"]["replicas"][late]
        with vision_server_in_thread(tiny_original, port=late_port, warmup=False):
            started = time.monotonic()
            wait_until(lambda: gateway.chat_service.vision.replicas.answering(), 10, "the late replica's Info")
            assert time.monotonic() - started < 6  # REPLICA_BACKOFF_S 0.2 + DNS_REFRESH_S 0.5 + the read
            assert "fingerprint=" in ready(port).json()["vision"]["replicas"][late]
            assert image_chat(port).status_code == 200



def test_ready_means_the_channel_chats_take_is_connected(stack, tiny_original):
    """/ready says 200 only once the balanced channel that chats take has a connected replica, not as soon as
    the replica's own Info channel answers: the two redial on their own (jittered) schedules, so a stack that
    started all at once could answer its first image chat with a 503 right after saying it was ready (what
    the launcher's test once met in CI)."""
    for _ in range(3):
        late_port = free_port()
        with stack.extra_gateway(vision_addresses=[f"127.0.0.1:{late_port}"], dns_refresh_s=0.5) as gateway:
            port = gateway.ports.http
            time.sleep(3)  # refused a few times: both channels in backoff (REPLICA_BACKOFF_S 2 s)
            with vision_server_in_thread(tiny_original, port=late_port, warmup=False):
                wait_until(lambda p=port: ready(p).status_code == 200, 20, "the gateway to say it is ready")
                assert gateway.chat_service.vision.replicas.connected()
                reply = image_chat(port)
                assert reply.status_code == 200, reply.text


def test_a_chat_waits_for_a_replica_that_is_back_instead_of_failing(stack, tiny_original):
    """A replica that came back a moment ago answers on its own Info channel before the balanced channel has
    redialed it (up to REPLICA_BACKOFF_S later): an image chat then waits for the balanced channel (at most
    REPLICA_BACKOFF_S + 1 s) and goes through, instead of a 503."""
    late_port = free_port()
    caught_in_backoff = 0  # comebacks where the balanced channel was still waiting to redial (about 1 in 4)
    with stack.extra_gateway(vision_addresses=[f"127.0.0.1:{late_port}"], dns_refresh_s=0.2) as gateway:
        replicas = gateway.chat_service.vision.replicas
        for _ in range(30):  # caught about 1 comeback in 4: never in 30 has a chance of 0.75**30 = 0.02 %
            time.sleep(2.5)  # away: the balanced channel backs off its redials
            with vision_server_in_thread(tiny_original, port=late_port, warmup=False):
                wait_until(replicas.reachable, 20, "the replica's own Info channel to connect")
                caught_in_backoff += replicas.channel_state() == "TRANSIENT_FAILURE"
                reply = image_chat(port=gateway.ports.http)
                assert reply.status_code == 200, reply.text
            if caught_in_backoff == 2:
                break
    assert caught_in_backoff >= 1, "the balanced channel was never caught redialing: the test proved nothing"
