"""The Redis embedding cache: lookups, stores and the per-image tiling memory, over `RedisStore` (one
Redis or a Redis Cluster; admission and outages live there: a Redis down, slow or busy is a miss, never
a failed chat).

Keys are built for cluster slots: everything about one image of one vision model shares the hash tag
`{<fingerprint>:<sha256>}`, so its embeddings (one per tiling), its tiling memory and its encode lock
live in one slot and may be read together; a request's lookup of several images is split per slot by
the cluster client.
"""

from __future__ import annotations

import logging

from ivl_gateway.embedding_codec import (
    CorruptEntry,
    ImageEmbedding,
    TilingChoice,
    cache_key,
    decode_entry,
    encode_entry,
    image_tag,
)
from ivl_gateway.metrics import GatewayMetrics
from ivl_gateway.redis_store import RedisStore
from ivl_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class EmbeddingCache:
    """Embeddings keyed by (vision fingerprint, image sha256, tiling). `enabled` is False without Redis."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._namespace = settings.cache_namespace
        self.store = RedisStore(settings, metrics)

    @property
    def enabled(self) -> bool:
        return self.store.enabled

    @property
    def available(self) -> bool:
        """False while Redis is being skipped after a failure."""
        return self.store.available

    def key(self, fingerprint: str, digest: str, tiling: TilingChoice) -> str:
        return cache_key(self._namespace, fingerprint, digest, tiling)

    def _tiling_key(self, fingerprint: str, digest: str) -> str:
        return f"{self._namespace}:{image_tag(fingerprint, digest)}:tiling"

    def decode(self, key: str, value: bytes | None, expected_hidden: int | None) -> ImageEmbedding | None:
        """A stored value as an embedding; None when missing, corrupt or of another width (counted)."""
        if value is None:
            return None
        try:
            return decode_entry(key, bytes(value), expected_hidden)
        except CorruptEntry as error:
            log.warning("dropping a corrupt cache entry %s: %s", key, error)
            self._metrics.cache_errors.labels(kind="corrupt").inc()
            return None

    async def get_many(self, keys: list[str], expected_hidden: int | None) -> list[ImageEmbedding | None]:
        """One MGET (per slot in a cluster); a missing, corrupt or mismatched entry is None (corrupt ones
        are deleted)."""
        if not keys or not self.store.enabled:
            return [None] * len(keys)
        values = await self.store.mget(keys)
        if values is None:
            return [None] * len(keys)
        found: list[ImageEmbedding | None] = []
        for key, value in zip(keys, values, strict=True):
            embedding = self.decode(key, value, expected_hidden)
            if embedding is None and value is not None:
                await self.store.delete(key)
            found.append(embedding)
        return found

    async def put_many(self, items: list[tuple[str, ImageEmbedding]]) -> None:
        if items and self.store.enabled:
            await self.store.set_many(((key, encode_entry(key, embedding)) for key, embedding in items),
                                      self._settings.cache_ttl_s)

    async def remembered_tiling(self, fingerprint: str, digests: list[str]) -> list[TilingChoice | None]:
        """The tiling each image was last encoded with (for earlier turns' images)."""
        if not digests or not self.store.enabled:
            return [None] * len(digests)
        values = await self.store.mget([self._tiling_key(fingerprint, d) for d in digests])
        if values is None:
            return [None] * len(digests)
        return [_parse_tiling(v) for v in values]

    async def remember_tiling(self, fingerprint: str, items: list[tuple[str, TilingChoice]]) -> None:
        if items and self.store.enabled:
            await self.store.set_many(((self._tiling_key(fingerprint, digest), tiling.tag().encode())
                                       for digest, tiling in items), self._settings.cache_ttl_s)

    async def ping(self) -> bool:
        return await self.store.ping()

    async def close(self) -> None:
        await self.store.close()


def _parse_tiling(value: bytes | None) -> TilingChoice | None:
    if not value:
        return None
    try:
        max_tiles, min_tiles, thumb = bytes(value).decode()[1:].split("-")
        return TilingChoice(int(max_tiles), int(min_tiles), thumb == "1")
    except ValueError:
        return None
