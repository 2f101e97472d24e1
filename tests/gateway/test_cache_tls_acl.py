"""The cache over TLS with an ACL user (`rediss://user:password@host:port/0?ssl_ca_certs=...`), against a real
redis-server with a TLS port and a user limited to the cache's key namespace, as docs/gateway.md "Redis" sets
it up. Certificates are made here with the openssl command (a CA and a server certificate for 127.0.0.1)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
from ivl_gateway.cache import EmbeddingCache
from ivl_gateway.embedding_codec import ImageEmbedding, TilingChoice, image_digest
from ivl_gateway.encode_lock import Claim, EncodeLocks
from ivl_gateway.metrics import GatewayMetrics
from ivl_gateway.settings import GatewaySettings
from ivl_proto.common.v1 import common_pb2
from support.redis_server import free_port

# What the gateway needs, and only on its own keys (docs/gateway.md "Redis": the ACL line to copy).
ACL = ["ivl-gateway", "on", ">s3cret-pass", "~ivl:emb:v1:*", "resetchannels", "-@all", "+get", "+mget", "+set",
       "+del", "+exists", "+pexpire", "+eval", "+ping"]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    if shutil.which("openssl") is None or shutil.which("redis-server") is None:
        pytest.skip("openssl / redis-server are not installed (scripts/setup_env.sh installs them)")
    folder = tmp_path_factory.mktemp("redis-tls")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=ivl-test-ca", cwd=folder)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "san.ext", cwd=folder)
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(folder / "server.pem"), "--tls-key-file", str(folder / "server.key"),
         "--tls-ca-cert-file", str(folder / "ca.pem"), "--tls-auth-clients", "no", "--save", "", "--appendonly",
         "no", "--dir", str(folder), "--user", "default", "off", "--user", *ACL],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"rediss://ivl-gateway:s3cret-pass@127.0.0.1:{port}/0?ssl_ca_certs={folder / 'ca.pem'}"
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.RedisError:
            assert process.poll() is None and time.monotonic() < deadline, "redis-server with TLS did not start"
            time.sleep(0.1)
    yield url, port, folder
    process.terminate()
    process.wait(timeout=10)


def embedding() -> ImageEmbedding:
    plan = common_pb2.ImagePlan(grid_cols=1, grid_rows=1, num_tiles=1, num_tokens=4, max_tiles=6, min_tiles=1,
                                use_thumbnail=True)
    return ImageEmbedding(dtype="float32", shape=(4, 8), data=bytes(range(128)), plan=plan)


async def test_cache_and_locks_over_tls_as_a_namespace_limited_acl_user(tls_redis):
    url, _, _ = tls_redis
    metrics = GatewayMetrics()
    settings = GatewaySettings(redis_url=url)
    cache = EmbeddingCache(settings, metrics)
    locks = EncodeLocks(settings, cache.store, metrics)
    try:
        key = cache.key("fp", image_digest(b"tls"), TilingChoice(6, 1, True))
        await cache.put_many([(key, embedding())])
        assert (await cache.get_many([key], 8))[0] == embedding()
        fresh = cache.key("fp", image_digest(b"tls-2"), TilingChoice(6, 1, True))
        assert await locks.claim([fresh]) == {fresh: Claim.MINE}  # the lock scripts run as this user too
        async with locks.held([fresh], {fresh: Claim.MINE}):
            pass
        await locks.close()
        assert await cache.ping()
        assert metrics.registry.get_sample_value("vision_cache_errors_total", {"kind": "get"}) is None
    finally:
        await cache.close()
    with pytest.raises(redis.exceptions.NoPermissionError):  # the user reaches nothing but the cache's keys
        redis.Redis.from_url(url).set("other:key", b"x")


async def test_a_wrong_password_or_an_untrusted_certificate_is_an_outage_not_a_crash(tls_redis):
    url, port, _ = tls_redis
    for bad in (url.replace("s3cret-pass", "wrong"),
                f"rediss://ivl-gateway:s3cret-pass@127.0.0.1:{port}/0"):  # no CA given: the server is not trusted
        metrics = GatewayMetrics()
        cache = EmbeddingCache(GatewaySettings(redis_url=bad), metrics)
        try:
            key = cache.key("fp", image_digest(b"bad"), TilingChoice(6, 1, True))
            assert await cache.get_many([key], 8) == [None]
            assert metrics.registry.get_sample_value("vision_cache_errors_total", {"kind": "get"}) == 1
            assert not await cache.ping()
        finally:
            await cache.close()
