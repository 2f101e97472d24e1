"""Several replicas behind one gateway, each service its own process: grpc's round robin, health checking
and retries (gateway/ivl_gateway/replicas.py) under a SIGKILL, a restart, and replicas joining and leaving
one DNS name (a loopback DNS server, like a headless Service). Timings are printed (pytest -s) and
measured for bench/RESULTS.md by bench/bench_scale_out.py.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from support.dns_server import running_dns
from support.load_client import chat_body
from support.redis_server import free_port
from support.scale_out import Load, images_seen, new_image, wait_until
from support.service_processes import process_backend

pytestmark = pytest.mark.slow

FAST_REPLICAS = {"default_max_tiles": 1, "replica_backoff_s": 0.5, "dns_refresh_s": 0.5, "info_timeout_s": 2.0}


def test_vision_replica_killed_then_restarted_under_load(tiny_original):
    with process_backend(tiny_original, vision_replicas=2, gateway=FAST_REPLICAS) as backend:
        a, b = backend.visions
        with Load(backend.gateway.http_url).running() as load:
            wait_until(lambda: images_seen(a.address) >= 2 and images_seen(b.address) >= 2, 90,
                       "both replicas to encode images (round robin)")
            killed_at = time.monotonic()
            a.kill()  # SIGKILL, possibly mid-EncodeImages: grpc retries that call on b
            load.wait_for(6)
            b_before = images_seen(b.address)
            # Up to 2 requests (one per client) were encoded before b_before was read but end after it: of
            # the next 6 that end, at least 4 were sent afterwards, each a new image that only b can encode.
            load.wait_for(6)
            assert images_seen(b.address) >= b_before + 4  # everything goes to b while a is dead
            a.start()
            a.wait_serving()
            serving_at = time.monotonic()
            back_s = wait_until(lambda: images_seen(a.address) >= 1, 30, "the restarted replica to get traffic")
            load.wait_for(4)
        outcomes = load.outcomes
    failed = [o for o in outcomes if o.status != 200]
    assert not failed, failed[:3]
    around_kill = [o.ended - o.started for o in outcomes if o.started <= killed_at + 2 and o.ended >= killed_at]
    print(f"\nvision replica SIGKILL: {len(outcomes)} requests, 0 failed; slowest request around the kill "
          f"{max(around_kill):.2f} s; restarted replica SERVING -> first image {back_s:.2f} s "
          f"(restart to SERVING {serving_at - killed_at:.1f} s after the kill)")


def test_llm_replica_killed_then_restarted_under_load(tiny_original):
    with process_backend(tiny_original, llm_replicas=2, gateway=FAST_REPLICAS,
                         llm={"context_length": 8192}) as backend:
        first = backend.llms[0]
        with Load(backend.gateway.http_url, images=False, max_tokens=2).running() as load:
            load.wait_for(6)
            killed_at = time.monotonic()
            first.kill()
            load.wait_for(8)
            first.start()
            first.wait_serving()
            restarted_at = time.monotonic()
            load.wait_for(8)
        outcomes = load.outcomes
    # A chat whose generation had started on the killed replica cannot move (its first tokens were sent);
    # at most one per client; every other one succeeds, also the ones sent at the moment of the kill.
    failed = [o for o in outcomes if o.status != 200]
    assert all(o.started < killed_at < o.ended for o in failed), failed[:3]
    assert len(failed) <= 2
    assert all('"unavailable"' in o.detail and "LLM" in o.detail for o in failed), failed[:3]
    after = [o for o in outcomes if o.started > killed_at]
    assert len(after) >= 14 and all(o.status == 200 for o in after)
    assert any(o.started > restarted_at for o in outcomes)


def test_replicas_behind_one_dns_name_follow_it(tiny_original):
    """Replicas on 127.0.0.1:P and 127.0.0.2:P (like pod IPs) behind one name of a loopback DNS server: a
    replica that joins gets traffic, one that leaves gets none, and a call running on a replica that left
    DNS still finishes (the old channel is closed with a grace period, never cut)."""
    port = free_port()
    name = "vision.ivl.test"
    with running_dns({name: ["127.0.0.1"]}) as dns, process_backend(
        tiny_original, vision_at=[("127.0.0.1", port), ("127.0.0.2", port)],
        gateway={**FAST_REPLICAS, "vision_addresses": f"dns://127.0.0.1:{dns.port}/{name}:{port}"},
    ) as backend:
        one, two = backend.visions

        def chat() -> httpx.Response:
            body = chat_body("What is this?", [new_image()], max_tokens=1, stream=False)
            return httpx.post(f"{backend.gateway.http_url}/v1/chat/completions", json=body, timeout=120)

        assert all(chat().status_code == 200 for _ in range(3))
        assert images_seen(one.address) == 3 and images_seen(two.address) == 0  # only what DNS names

        dns.set(name, ["127.0.0.1", "127.0.0.2"])
        changed = time.monotonic()
        wait_until(lambda: chat().status_code == 200 and images_seen(two.address) > 0, 30, "the joined replica")
        joined_s = time.monotonic() - changed

        dns.set(name, ["127.0.0.2"])
        changed = time.monotonic()

        def only_two() -> bool:
            before = images_seen(one.address)
            return all(chat().status_code == 200 for _ in range(4)) and images_seen(one.address) == before

        wait_until(only_two, 30, "the replica that left DNS to get no more calls")
        left_s = time.monotonic() - changed

        # A call in flight on a replica while it leaves DNS: it finishes, it is not cancelled.
        dns.set(name, ["127.0.0.1"])
        wait_until(lambda: backend.gateway.ready()[1]["vision"]["replicas"].keys() == {one.address}, 30,
                   "the gateway to see only 127.0.0.1")
        before = images_seen(one.address)
        assert chat().status_code == 200 and images_seen(one.address) == before + 1  # connected to it
        one.pause()  # the call below then waits inside replica one
        result: dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", chat()))
        thread.start()
        time.sleep(1.0)
        dns.set(name, ["127.0.0.2"])
        wait_until(lambda: backend.gateway.ready()[1]["vision"]["replicas"].keys() == {two.address}, 30,
                   "the gateway to see only 127.0.0.2")
        assert chat().status_code == 200  # new calls go to replica two while one is frozen
        assert thread.is_alive()  # the call on replica one still waits: it was not cut
        one.resume()
        thread.join(120)
        assert result["r"].status_code == 200, result["r"].text
    print(f"\nDNS name: a joining replica got traffic {joined_s:.1f} s after the DNS change, a leaving one got "
          f"none {left_s:.1f} s after (dns_refresh_s={FAST_REPLICAS['dns_refresh_s']}); a call in flight on "
          "the leaving replica finished")
