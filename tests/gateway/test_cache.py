"""The Redis embedding cache against a real redis-server: format, corrupt entries, TTL, LRU, outages."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
import redis
from ivl_gateway.cache import EmbeddingCache
from ivl_gateway.embedding_codec import (
    CorruptEntry,
    ImageEmbedding,
    TilingChoice,
    decode_entry,
    encode_entry,
    image_digest,
)
from ivl_gateway.metrics import GatewayMetrics
from ivl_gateway.settings import GatewaySettings
from ivl_gateway.singleflight import SingleFlight
from ivl_proto.common.v1 import common_pb2
from support.redis_server import RedisServer, running_redis

TILING = TilingChoice(6, 1, True)


def embedding(rows: int = 512, hidden: int = 64, seed: int = 0, dtype: str = "float32") -> ImageEmbedding:
    values = np.random.default_rng(seed).standard_normal((rows, hidden)).astype(np.float32)
    if dtype == "bfloat16":
        data = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    else:
        data = values.astype(dtype).tobytes()
    plan = common_pb2.ImagePlan(grid_cols=1, grid_rows=1, num_tiles=rows // 256, num_tokens=rows,
                                original_width=600, original_height=400, has_thumbnail=False, max_tiles=6,
                                min_tiles=1, use_thumbnail=True)
    return ImageEmbedding(dtype=dtype, shape=(rows, hidden), data=data, plan=plan)


def metric(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def redis_server():
    with running_redis(maxmemory="64mb") as server:
        yield server


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_codec_round_trip(dtype):
    original = embedding(dtype=dtype)
    value = encode_entry("k1", original)
    back = decode_entry("k1", value, expected_hidden=64)
    assert back.data == original.data and back.shape == original.shape and back.dtype == dtype
    assert back.plan == original.plan
    assert not value.startswith(b"\x80")  # not a pickle


def test_codec_rejects_corrupt_and_mismatched_values():
    value = encode_entry("k1", embedding())
    with pytest.raises(CorruptEntry, match="another key"):
        decode_entry("k2", value)
    with pytest.raises(CorruptEntry, match="hidden size"):
        decode_entry("k1", value, expected_hidden=128)
    flipped = bytearray(value)
    flipped[-5] ^= 0xFF
    with pytest.raises(CorruptEntry, match="checksum"):
        decode_entry("k1", bytes(flipped))
    with pytest.raises(CorruptEntry):
        decode_entry("k1", value[:-10])
    with pytest.raises(CorruptEntry):
        decode_entry("k1", b"garbage")
    with pytest.raises(CorruptEntry, match="magic"):
        decode_entry("k1", b"XXXX" + value[4:])


def test_key_names_fingerprint_image_and_tiling():
    cache = EmbeddingCache(GatewaySettings(), GatewayMetrics())
    digest = image_digest(b"abc")
    key = cache.key("fp1", digest, TILING)
    assert key == f"ivl:emb:v1:{{fp1:{digest}}}:t6-1-1"  # one cluster hash tag per image and model
    assert cache.key("fp2", digest, TILING) != key
    assert cache.key("fp1", digest, TilingChoice(6, 1, False)) != key


async def test_store_lookup_ttl_and_corrupt_entry_is_a_miss(redis_server):
    metrics = GatewayMetrics()
    cache = EmbeddingCache(GatewaySettings(redis_url=redis_server.url, cache_ttl_s=120), metrics)
    try:
        key = cache.key("fp", image_digest(b"one"), TILING)
        other = cache.key("fp", image_digest(b"two"), TILING)
        await cache.put_many([(key, embedding())])
        found = await cache.get_many([key, other], expected_hidden=64)
        assert found[0] is not None and found[0].data == embedding().data and found[1] is None
        client = redis.Redis.from_url(redis_server.url)
        assert 0 < client.ttl(key) <= 120
        client.set(key, b"IVLE" + b"\x00" * 40)  # a corrupt entry: a miss, deleted, counted
        assert await cache.get_many([key], expected_hidden=64) == [None]
        assert client.exists(key) == 0
        assert metric(metrics, "vision_cache_errors_total", kind="corrupt") == 1
        await cache.remember_tiling("fp", [(image_digest(b"one"), TILING)])
        assert await cache.remembered_tiling("fp", [image_digest(b"one"), image_digest(b"x")]) == [TILING, None]
    finally:
        await cache.close()


def test_redis_is_configured_for_lru_eviction(redis_server):
    config = redis.Redis.from_url(redis_server.url).config_get("maxmemory*")
    assert config["maxmemory-policy"] == "allkeys-lru" and int(config["maxmemory"]) == 64 * 2**20


async def test_redis_down_then_back_caching_resumes_by_itself(caplog):
    server = RedisServer()
    server.start()
    metrics = GatewayMetrics()
    settings = GatewaySettings(redis_url=server.url, redis_retry_s=0.2, redis_timeout_s=0.3)
    cache = EmbeddingCache(settings, metrics)
    key = cache.key("fp", image_digest(b"img"), TILING)
    try:
        await cache.put_many([(key, embedding())])
        server.stop()
        with caplog.at_level(logging.WARNING, logger="ivl_gateway.redis_store"):
            for _ in range(3):  # fast misses, one warning, errors counted
                assert await cache.get_many([key], 64) == [None]
                await cache.put_many([(key, embedding())])
                await asyncio.sleep(0.25)
        warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(warnings) == 1
        assert metric(metrics, "vision_cache_errors_total", kind="get") >= 1
        server.start()  # same port, empty (no persistence)
        await asyncio.sleep(0.3)
        await cache.put_many([(key, embedding())])
        assert (await cache.get_many([key], 64))[0] is not None
    finally:
        await cache.close()
        server.stop()


async def test_single_flight_gives_one_owner_and_shares_the_result():
    flight: SingleFlight[str, int] = SingleFlight()
    owned, waiting = flight.claim(["a", "b", "a"])
    assert owned == ["a", "b"] and waiting == {}
    owned2, waiting2 = flight.claim(["a", "c"])
    assert owned2 == ["c"] and set(waiting2) == {"a"}
    flight.resolve("a", 7)
    assert await waiting2["a"] == 7
    flight.fail("b", RuntimeError("boom"))
    flight.resolve("c", 1)
    assert len(flight) == 0
