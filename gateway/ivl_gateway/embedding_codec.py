"""Cache keys and the binary value format of cached image embeddings (no pickle).

Value = header + raw embedding bytes:

    magic "IVLE" | version u8 | dtype code u8 (ivl_proto.dtypes) | ndim u8 | reserved u8 | key digest 16 bytes |
    crc32 of the payload u32 | payload length u64 | shape ndim x u64 | plan 12 x i32 | payload

The key digest binds a value to the key it was stored under, the crc32 and the length catch truncated
or corrupted bytes; any mismatch makes `decode_entry` raise CorruptEntry and the caller treats the
entry as a miss (and deletes it).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

from ivl_proto import dtypes
from ivl_proto.common.v1 import common_pb2
from ivl_proto.tensor_wire import WireTensor

MAGIC = b"IVLE"
VERSION = 1
_FIXED = struct.Struct("<4sBBBB16sIQ")
_PLAN = struct.Struct("<12i")
_PLAN_FIELDS = (
    "grid_cols", "grid_rows", "num_tiles", "resize_width", "resize_height", "original_width",
    "original_height", "has_thumbnail", "num_tokens", "max_tiles", "min_tiles", "use_thumbnail",
)


class CorruptEntry(ValueError):
    """A cached value that cannot be trusted (wrong magic/version/key/length/checksum)."""


@dataclass(frozen=True)
class TilingChoice:
    """The effective tiling options an image is encoded with (part of its cache key)."""

    max_tiles: int
    min_tiles: int
    use_thumbnail: bool

    def to_pb(self) -> common_pb2.TilingOptions:
        return common_pb2.TilingOptions(
            max_tiles=self.max_tiles, min_tiles=self.min_tiles, use_thumbnail=self.use_thumbnail
        )

    def tag(self) -> str:
        return f"t{self.max_tiles}-{self.min_tiles}-{int(self.use_thumbnail)}"


@dataclass(frozen=True)
class ImageEmbedding:
    """One image's embedding as raw bytes (never decoded in the gateway) plus its tiling plan. `data` is a view
    into what it came in (the vision service's response, a Redis value) where possible: no copy until the one
    into the next message (`to_wire`, ivl_proto.tensor_wire)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview
    plan: common_pb2.ImagePlan

    def to_wire(self) -> WireTensor:
        return WireTensor(self.dtype, self.shape, self.data)

    def to_tensor_pb(self) -> common_pb2.Tensor:
        """As a protobuf message (copies the data: the embedding hops use to_wire)."""
        return common_pb2.Tensor(dtype=self.dtype, shape=list(self.shape), data=bytes(self.data))


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_tag(fingerprint: str, digest: str) -> str:
    """`{<vision fingerprint>:<sha256>}`: the Redis Cluster hash tag of every key about one image of one
    model (its embeddings, tiling memory and encode lock share a slot)."""
    return f"{{{fingerprint}:{digest}}}"


def cache_key(namespace: str, fingerprint: str, digest: str, tiling: TilingChoice) -> str:
    """`<namespace>:{<vision fingerprint>:<sha256 of the image bytes>}:<tiling tag>`."""
    return f"{namespace}:{image_tag(fingerprint, digest)}:{tiling.tag()}"


def _key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()[:16]


def encode_entry(key: str, embedding: ImageEmbedding) -> bytes:
    spec = dtypes.DTYPES.get(embedding.dtype)
    if spec is None:
        raise ValueError(f"embedding dtype {embedding.dtype!r} cannot be cached")
    size = memoryview(embedding.data).nbytes
    header = _FIXED.pack(
        MAGIC, VERSION, spec.code, len(embedding.shape), 0, _key_digest(key), zlib.crc32(embedding.data), size,
    )
    shape = struct.pack(f"<{len(embedding.shape)}Q", *embedding.shape)
    plan = _PLAN.pack(*(int(getattr(embedding.plan, name)) for name in _PLAN_FIELDS))
    return b"".join((header, shape, plan, embedding.data))


def decode_entry(key: str, value: bytes, expected_hidden: int | None = None) -> ImageEmbedding:
    """Parse and verify a cached value; CorruptEntry when anything does not match. The embedding's data is a view
    into `value` (no copy)."""
    if len(value) < _FIXED.size:
        raise CorruptEntry(f"entry is {len(value)} bytes, shorter than its header")
    magic, version, code, ndim, _, digest, crc, length = _FIXED.unpack_from(value, 0)
    if magic != MAGIC or version != VERSION:
        raise CorruptEntry(f"unknown magic/version {magic!r}/{version}")
    if digest != _key_digest(key):
        raise CorruptEntry("entry was stored under another key")
    spec = dtypes.by_code(code)
    if spec is None or not 1 <= ndim <= 4:
        raise CorruptEntry(f"bad dtype code {code} or ndim {ndim}")
    offset = _FIXED.size
    shape = struct.unpack_from(f"<{ndim}Q", value, offset)
    offset += 8 * ndim
    plan_values = _PLAN.unpack_from(value, offset)
    offset += _PLAN.size
    payload = memoryview(value)[offset:]
    count = 1
    for dim in shape:
        count *= dim
    if payload.nbytes != length or count * spec.itemsize != length:
        raise CorruptEntry(f"payload is {payload.nbytes} bytes; header says {length}, shape {list(shape)}")
    if zlib.crc32(payload) != crc:
        raise CorruptEntry("payload checksum mismatch")
    if expected_hidden is not None and shape[-1] != expected_hidden:
        raise CorruptEntry(f"hidden size {shape[-1]} != expected {expected_hidden}")
    plan = common_pb2.ImagePlan(
        **{name: (bool(v) if name in ("has_thumbnail", "use_thumbnail") else v)
           for name, v in zip(_PLAN_FIELDS, plan_values, strict=True)}
    )
    return ImageEmbedding(dtype=spec.name, shape=tuple(shape), data=payload, plan=plan)
