"""The cross-gateway encode lock (encode_lock.py) on a real redis-server and a real Redis Cluster: claims,
renewal, release, expiry of a dead holder's lock, and through a gateway: a request takes over an image whose
lock was left by a gateway that died, and a request whose client leaves while it waits never encodes."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import redis
from gateway_helpers import data_url, metric, new_png, vision_images_seen
from ivl_gateway.embedding_codec import TilingChoice, image_digest
from ivl_gateway.encode_lock import Claim, EncodeLocks, lock_key
from ivl_gateway.metrics import GatewayMetrics
from ivl_gateway.redis_store import RedisStore
from ivl_gateway.settings import GatewaySettings
from support.redis_cluster import running_redis_cluster

KEY = "ivl:emb:v1:{fp:abc}:t6-1-1"


@pytest.fixture(scope="module", params=["single", "cluster"])
def redis_url(request, stack):
    if request.param == "single":
        yield stack.redis.url, False
    else:
        with running_redis_cluster() as cluster:
            yield cluster.url, True


def locks_of(url: str, cluster: bool, ttl_s: float = 1.0) -> tuple[EncodeLocks, RedisStore, GatewayMetrics]:
    settings = GatewaySettings(redis_url=url, redis_cluster=cluster, encode_lock_ttl_s=ttl_s)
    metrics = GatewayMetrics()
    store = RedisStore(settings, metrics)
    return EncodeLocks(settings, store, metrics), store, metrics


async def test_claim_renew_release_and_expiry(redis_url):
    url, cluster = redis_url
    (first, store1, _), (second, store2, metrics2) = locks_of(url, cluster), locks_of(url, cluster)
    key = f"{KEY}:{time.monotonic_ns()}"
    try:
        assert await first.claim([key]) == {key: Claim.MINE}
        assert await second.claim([key]) == {key: Claim.THEIRS}
        async with first.held([key], {key: Claim.MINE}):
            await asyncio.sleep(1.5)  # longer than the TTL: renewed, still held
            assert await second.claim([key]) == {key: Claim.THEIRS}
        await first.close()  # its release has run: the lock is gone, nothing was stored
        found, free = await second.wait([key])
        assert (found, free) == ({}, [key]) and metric_value(metrics2, "vision_cache_lock_takeovers_total") == 1
        assert await second.claim([key]) == {key: Claim.MINE}  # the taker-over holds it now
        assert await first.claim([key]) == {key: Claim.THEIRS}
        await store2.set_many([(key, b"entry")], 60)
        assert await first.claim([key]) == {key: Claim.CACHED}  # an entry is there: nobody encodes
        assert await first.wait([key]) == ({key: b"entry"}, [])

        dead = f"{KEY}:dead:{time.monotonic_ns()}"
        assert await first.claim([dead]) == {dead: Claim.MINE}  # then its holder "dies": never renewed
        started = time.monotonic()
        found, free = await second.wait([dead])
        assert free == [dead] and 0.5 < time.monotonic() - started < 5  # free once the 1 s TTL ran out
    finally:
        await store1.close()
        await store2.close()


def metric_value(metrics: GatewayMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_without_redis_every_claim_is_mine():
    settings = GatewaySettings()
    locks = EncodeLocks(settings, RedisStore(settings, GatewayMetrics()), GatewayMetrics())
    assert asyncio.run(locks.claim(["a", "b"])) == {"a": Claim.MINE, "b": Claim.MINE}


def _image_lock(stack, gateway, png: bytes) -> str:
    """The Redis lock key of `png` as the gateway will claim it (its fingerprint and default tiling)."""
    service = gateway.chat_service
    fingerprint = stack.run(service.vision.info()).fingerprint
    tiling: TilingChoice = stack.run(service.default_tiling())[0]
    return lock_key(service.cache.key(fingerprint, image_digest(png), tiling))


def _chat_body(png: bytes) -> dict:
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png)}}, {"type": "text", "text": "?"}]}], "max_tokens": 1}


def test_a_request_takes_over_an_image_whose_holder_died(stack):
    with stack.extra_gateway(encode_lock_ttl_s=1.0) as gateway:
        png = new_png(320, 200)
        held = redis.Redis.from_url(stack.redis.url)
        held.set(_image_lock(stack, gateway, png), "a-gateway-that-died", px=1500)  # never renewed, never released
        before = vision_images_seen(stack.vision_addresses[0])
        started = time.monotonic()
        reply = httpx.post(f"http://127.0.0.1:{gateway.ports.http}/v1/chat/completions", json=_chat_body(png),
                           timeout=60)
        assert reply.status_code == 200, reply.text
        assert time.monotonic() - started >= 1.0  # it waited for the dead holder's lock to expire
        assert vision_images_seen(stack.vision_addresses[0]) - before == 1
        assert metric(gateway, "vision_cache_lock_waits_total") == 1
        assert metric(gateway, "vision_cache_lock_takeovers_total") == 1
        held.close()


def test_a_waiter_whose_client_leaves_stops_waiting_and_never_encodes(stack):
    with stack.extra_gateway(encode_lock_ttl_s=1.0) as gateway:
        png = new_png(330, 200)
        held = redis.Redis.from_url(stack.redis.url)
        held.set(_image_lock(stack, gateway, png), "another-gateway", px=2000)
        before = vision_images_seen(stack.vision_addresses[0])
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"http://127.0.0.1:{gateway.ports.http}/v1/chat/completions", json=_chat_body(png),
                       timeout=0.7)
        time.sleep(3.0)  # the lock has expired by now: a waiter still there would take over and encode
        assert vision_images_seen(stack.vision_addresses[0]) == before
        assert metric(gateway, "vision_cache_lock_waits_total") == 1
        assert metric(gateway, "vision_cache_lock_takeovers_total") == 0
        assert metric(gateway, "gateway_requests_in_flight", api="http") == 0
        held.close()
