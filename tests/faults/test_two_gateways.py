"""Single flight across gateway processes (encode_lock.py): two real gateway processes, one vision service,
one Redis. 8 concurrent requests for one new image, 4 to each gateway, cause exactly 1 encode with the lock
and 2 without it (counted by the vision service itself); a lock holder killed with SIGKILL is taken over by
the other gateway once its lock expires.

To make "concurrent" certain on 2 busy cores, the vision service is frozen (SIGSTOP) while the requests
arrive: every request is then inside a gateway, waiting, before any encode can finish.
bench/bench_scale_out.py measures the same rounds repeatedly, also without the freeze.
"""

from __future__ import annotations

import time

import pytest
import redis
from support.scale_out import (
    chat_in_thread,
    eight_requests_for_one_new_image,
    new_image,
    post_chat,
    wait_until,
)
from support.service_processes import process_backend

pytestmark = pytest.mark.slow

GATEWAYS = {"default_max_tiles": 1, "encode_lock_ttl_s": 1.5}


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
        for gateway in (holder, waiter):  # both have served before
            assert post_chat(gateway.http_url, [new_image()]).status == 200
        image = new_image(200, 150)
        backend.vision.pause()
        held: list = []
        waited: list = []
        try:
            chat_in_thread(holder.http_url, image, held, timeout_s=30)
            wait_until(lambda: any(locks.scan_iter(match="*:lock")), 30, "the holder to take the image's lock")
            chat_in_thread(waiter.http_url, image, waited)
            wait_until(lambda: waiter.metric("vision_cache_lock_waits_total") == 1, 30, "the waiter to wait")
            holder.kill()  # SIGKILL: no release; its lock lives until it expires
            killed_at = time.monotonic()
        finally:
            backend.vision.resume()
        wait_until(lambda: bool(waited), 60, "the waiter's reply")
        served_s = waited[0].ended - killed_at
        assert waited[0].status == 200, waited[0]
        assert waiter.metric("vision_cache_lock_takeovers_total") == 1
        locks.close()
    print(f"\nlock holder SIGKILLed mid-encode: the other gateway answered {served_s:.2f} s later "
          f"(lock TTL {GATEWAYS['encode_lock_ttl_s']} s, renewed every third of it)")
    # it took over only once the dead holder's lock expired (at least 2/3 of the TTL after its last renewal)
    assert served_s >= GATEWAYS["encode_lock_ttl_s"] * 2 / 3 - 0.1
