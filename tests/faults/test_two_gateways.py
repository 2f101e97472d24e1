"""Single flight across gateway processes (encode_lock.py): two real gateway processes, one vision service,
one Redis. 8 concurrent requests for one new image, 4 to each gateway, cause exactly 1 encode with the lock
and 2 without it (counted by the vision service itself); a lock holder killed with SIGKILL is taken over by
the other gateway once its lock expires.

To make "concurrent" certain on 2 busy cores, the vision service is frozen (SIGSTOP) while the requests
arrive: every request is then inside a gateway, waiting, before any encode can finish.
"""

from __future__ import annotations

import itertools
import threading
import time

import grpc
import httpx
import pytest
import redis
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.vision.v1 import vision_pb2, vision_pb2_grpc
from support.load_client import chat_body, unique_png
from support.service_processes import GatewayProcess, process_backend

pytestmark = pytest.mark.slow

_seeds = itertools.count(60_000)
GATEWAYS = {"default_max_tiles": 1, "encode_lock_ttl_s": 1.5}


def images_seen(address: str) -> int:
    with grpc.insecure_channel(address, options=message_size_options()) as channel:
        info = vision_pb2_grpc.VisionEncoderStub(channel).Info(vision_pb2.InfoRequest(), timeout=10)
    return int(info.batching.requests)


def wait_until(condition, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def total(gateways: list[GatewayProcess], name: str) -> float:
    return sum(g.metric(name) for g in gateways)


def send(gateway: GatewayProcess, image: bytes, results: list, timeout_s: float = 120) -> threading.Thread:
    def run() -> None:
        body = chat_body("What is this?", [image], max_tokens=1, stream=False)
        try:
            results.append(httpx.post(f"{gateway.http_url}/v1/chat/completions", json=body, timeout=timeout_s))
        except httpx.HTTPError as error:
            results.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def eight_requests_for_one_new_image(backend, gateways: list[GatewayProcess]) -> tuple[int, float]:
    """4 requests to each gateway, all arriving while the vision service is frozen; returns the encodes (the
    vision service's count) and the images that waited on another gateway's lock."""
    for gateway in gateways:  # gateways that have served before (connected to the vision service)
        warm: list = []
        send(gateway, unique_png(next(_seeds), 120, 90), warm).join(120)
        assert warm[0].status_code == 200, warm
    image = unique_png(next(_seeds), 200, 150)
    seen = images_seen(backend.vision.address)
    waits = total(gateways, "vision_cache_singleflight_waits_total")
    lock_waits = total(gateways, "vision_cache_lock_waits_total")
    backend.vision.pause()
    results: list = []
    try:
        threads = [send(gateways[i % 2], image, results) for i in range(8)]
        # every request is in: 3 in-process waiters per gateway, and with the lock one gateway waits on the other
        wait_until(lambda: total(gateways, "vision_cache_singleflight_waits_total") == waits + 6, 60,
                   "3 in-process single-flight waiters on each gateway")
        time.sleep(0.5)  # both owners have claimed (or, without the lock, sent their EncodeImages)
    finally:
        backend.vision.resume()
    for thread in threads:
        thread.join(120)
    assert [getattr(r, "status_code", r) for r in results] == [200] * 8, results
    encodes = images_seen(backend.vision.address) - seen
    assert total(gateways, "vision_encoded_images_total") >= encodes
    return encodes, total(gateways, "vision_cache_lock_waits_total") - lock_waits


def test_two_gateways_and_eight_concurrent_requests_encode_a_new_image_once(tiny_original):
    with process_backend(tiny_original, gateway=GATEWAYS) as backend, backend.extra_gateway() as second:
        with_lock, lock_waits = eight_requests_for_one_new_image(backend, [backend.gateway, second])
        with backend.extra_gateway(encode_lock=False) as third, backend.extra_gateway(encode_lock=False) as fourth:
            without_lock, no_lock_waits = eight_requests_for_one_new_image(backend, [third, fourth])
    print(f"\n2 gateways x 8 concurrent requests for one new image: {with_lock} encode with the Redis lock, "
          f"{without_lock} without it")
    assert (with_lock, lock_waits) == (1, 1)  # one gateway encoded, the other waited for its entry
    assert (without_lock, no_lock_waits) == (2, 0)  # each gateway's own single flight: one encode per gateway


def test_a_lock_holder_killed_mid_encode_is_taken_over_after_its_lock_expires(tiny_original):
    with process_backend(tiny_original, gateway=GATEWAYS) as backend, \
            backend.extra_gateway() as holder, backend.extra_gateway() as waiter:
        assert backend.redis is not None
        locks = redis.Redis.from_url(backend.redis.url)
        for gateway in (holder, waiter):
            warm: list = []
            send(gateway, unique_png(next(_seeds), 120, 90), warm).join(120)
            assert warm[0].status_code == 200, warm
        image = unique_png(next(_seeds), 200, 150)
        backend.vision.pause()
        held: list = []
        waited: list = []
        try:
            send(holder, image, held, timeout_s=30)
            wait_until(lambda: any(locks.scan_iter(match="*:lock")), 30, "the holder to take the image's lock")
            send(waiter, image, waited)
            wait_until(lambda: waiter.metric("vision_cache_lock_waits_total") == 1, 30, "the waiter to wait")
            holder.kill()  # SIGKILL: no release; its lock lives until it expires
            killed_at = time.monotonic()
        finally:
            backend.vision.resume()
        wait_until(lambda: bool(waited), 60, "the waiter's reply")
        served_s = time.monotonic() - killed_at
        assert waited[0].status_code == 200, waited[0]
        assert waiter.metric("vision_cache_lock_takeovers_total") == 1
        locks.close()
    print(f"\nlock holder SIGKILLed mid-encode: the other gateway answered {served_s:.2f} s later "
          f"(lock TTL {GATEWAYS['encode_lock_ttl_s']} s, renewed every third of it)")
    # it took over only once the dead holder's lock expired (at least 2/3 of the TTL after its last renewal)
    assert served_s >= GATEWAYS["encode_lock_ttl_s"] * 2 / 3 - 0.1
