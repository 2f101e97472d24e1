"""The embedding cache on a real 3-primary Redis Cluster (tests/support/redis_cluster.py): keys spread over
the primaries, one image's keys in one slot, lookups across slots in one call, bursts that are misses and not
outages (both modes), a primary that dies and comes back, and a gateway serving chats from the cluster."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis
from gateway_helpers import data_url, new_png
from ivl_gateway.cache import EmbeddingCache
from ivl_gateway.embedding_codec import ImageEmbedding, TilingChoice, image_digest
from ivl_gateway.metrics import GatewayMetrics
from ivl_gateway.settings import GatewaySettings
from ivl_proto.common.v1 import common_pb2
from support.redis_cluster import running_redis_cluster
from support.redis_server import running_redis

TILING = TilingChoice(6, 1, True)


def embedding(seed: int, rows: int = 256, hidden: int = 32) -> ImageEmbedding:
    data = bytes((seed + i) % 251 for i in range(rows * hidden * 4))
    plan = common_pb2.ImagePlan(grid_cols=1, grid_rows=1, num_tiles=1, num_tokens=rows, original_width=64,
                                original_height=64, max_tiles=6, min_tiles=1, use_thumbnail=True)
    return ImageEmbedding(dtype="float32", shape=(rows, hidden), data=data, plan=plan)


def metric(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def cluster():
    with running_redis_cluster() as running:
        yield running


def cluster_settings(cluster, **overrides) -> GatewaySettings:
    return GatewaySettings(redis_url=cluster.url, redis_cluster=True, **overrides)


async def test_entries_spread_over_the_primaries_and_one_image_stays_in_one_slot(cluster):
    metrics = GatewayMetrics()
    cache = EmbeddingCache(cluster_settings(cluster, cache_ttl_s=300), metrics)
    try:
        digests = [image_digest(f"image {i}".encode()) for i in range(12)]
        keys = [cache.key("fp", d, TILING) for d in digests]
        await cache.put_many([(k, embedding(i)) for i, k in enumerate(keys)])
        await cache.remember_tiling("fp", [(d, TILING) for d in digests])
        assert {cluster.node_of(k) for k in keys} == set(cluster.ports)  # every primary holds some

        found = await cache.get_many([*keys, cache.key("fp", image_digest(b"none"), TILING)], expected_hidden=32)
        assert [f.data if f else None for f in found] == [embedding(i).data for i in range(12)] + [None]
        assert await cache.remembered_tiling("fp", digests[:3]) == [TILING] * 3

        client = redis.RedisCluster.from_url(cluster.url)
        for digest, key in zip(digests, keys, strict=True):  # one image: one slot for all its keys
            slots = {client.keyslot(k) for k in (key, cache.key("fp", digest, TilingChoice(1, 1, False)),
                                                 f"ivl:emb:v1:{{fp:{digest}}}:tiling", f"{key}:lock")}
            assert len(slots) == 1
        assert 0 < client.ttl(keys[0]) <= 300
        client.set(keys[5], b"IVLE" + b"\x00" * 40)  # a corrupt entry on some primary: a miss, deleted
        assert (await cache.get_many([keys[5]], expected_hidden=32)) == [None]
        assert client.exists(keys[5]) == 0
        assert metric(metrics, "vision_cache_errors_total", kind="corrupt") == 1
        assert metric(metrics, "vision_cache_errors_total", kind="get") == 0
        client.close()
    finally:
        await cache.close()


@pytest.mark.parametrize("mode", ["single", "cluster"])
async def test_a_burst_beyond_the_connection_limit_is_a_miss_not_an_outage(cluster, mode):
    """64 concurrent lookups with 2 connections and a 10 ms wait: some are misses for their request
    (counted), none is an outage: Redis stays on for the next caller."""
    with running_redis() as single:
        url = single.url if mode == "single" else cluster.url
        metrics = GatewayMetrics()
        settings = GatewaySettings(redis_url=url, redis_cluster=mode == "cluster", redis_max_connections=2,
                                   redis_pool_wait_s=0.01)
        cache = EmbeddingCache(settings, metrics)
        try:
            key = cache.key("fp", image_digest(b"burst"), TILING)
            await cache.put_many([(key, embedding(1, rows=2048))])  # 256 KiB: each read takes a moment
            results = await asyncio.gather(*(cache.get_many([key], 32) for _ in range(64)))
            served = sum(r[0] is not None for r in results)
            assert 0 < served < 64, served
            assert metric(metrics, "vision_cache_pool_wait_timeouts_total") == 64 - served
            assert metric(metrics, "vision_cache_pool_waits_total") >= 64 - served
            assert metric(metrics, "vision_cache_errors_total", kind="get") == 0
            assert cache.available and (await cache.get_many([key], 32))[0] is not None
        finally:
            await cache.close()


async def test_a_primary_down_serves_uncached_then_caching_resumes(cluster):
    metrics = GatewayMetrics()
    cache = EmbeddingCache(cluster_settings(cluster, redis_retry_s=0.3, redis_timeout_s=0.5), metrics)
    try:
        keys = [cache.key("fp2", image_digest(f"down {i}".encode()), TILING) for i in range(9)]
        await cache.put_many([(k, embedding(i)) for i, k in enumerate(keys)])
        victim = cluster.node_of(keys[0])
        cluster.kill(victim)
        loop = asyncio.get_running_loop()
        for _ in range(5):  # misses, quickly; never an exception
            started = loop.time()
            assert await cache.get_many(keys, 32) == [None] * 9
            assert loop.time() - started < 3.0
            await asyncio.sleep(0.3)
        assert metric(metrics, "vision_cache_errors_total", kind="get") >= 1
        cluster.restart(victim)  # back with its slots, empty (no persistence)
        deadline = loop.time() + 30
        fresh = cache.key("fp2", image_digest(b"after"), TILING)
        while True:
            await cache.put_many([(fresh, embedding(7))])
            if (await cache.get_many([fresh], 32))[0] is not None:
                break
            assert loop.time() < deadline, "caching did not resume after the restart"
            await asyncio.sleep(0.3)
        survivors = await cache.get_many(keys, 32)  # entries of the other primaries were never lost
        assert any(s is not None for s in survivors)
    finally:
        await cache.close()


def test_a_gateway_serves_cached_chats_from_the_cluster(stack, cluster):
    with stack.extra_gateway(redis_url=cluster.url, redis_cluster=True) as gateway:
        url = f"http://127.0.0.1:{gateway.ports.http}"
        png = new_png()
        body = {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png)}}, {"type": "text", "text": "?"}]}],
            "max_tokens": 1}
        first = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        second = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        assert [first["ivl"]["cache_hits"], second["ivl"]["cache_hits"]] == [0, 1]
        assert httpx.get(f"{url}/ready", timeout=30).json()["redis"] == "ok"
