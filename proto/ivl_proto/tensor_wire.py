"""Embeddings on the wire with one copy per hop: protobuf messages written and read around their Tensor data.

Python protobuf (upb) copies a bytes field on every set and every read, and copies a submessage again when it
goes into a parent: a 40 MB embedding (13 tiles of a 6144-wide LLM in bf16) was copied 4-6 times per hop.
Protobuf's wire format is stable and simple, so the three messages that carry embeddings are written and
read here directly:
- writing: the message's small fields are serialized by protobuf, each Tensor is tag + length + dtype + packed
  shape + data, and `b"".join` of the pieces makes the message with the ONE copy of each tensor's bytes (from
  the numpy array, the Redis value or the received message: memoryviews, no copy before);
- reading: `split_tensors` walks the received bytes and returns the message parsed by protobuf WITHOUT the
  tensors' data (small) plus a memoryview of each tensor's data inside the received bytes (no copy).
The bytes are exactly what protobuf would write or read (tests/proto: parsed back by the generated classes,
equal field by field), so peers that use the generated classes interoperate.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ivl_proto.dtypes import numpy_dtype
from ivl_proto.errors import invalid

Buffer = bytes | memoryview
_WIRE_VARINT, _WIRE_FIXED64, _WIRE_LEN, _WIRE_FIXED32 = 0, 1, 2, 5
# Field numbers of ivl.common.v1.Tensor
_DTYPE, _SHAPE, _DATA = 1, 2, 3


def varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_prefix(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited field (bytes, string, submessage) of `length` bytes."""
    return _tag(number, _WIRE_LEN) + varint(length)


@dataclass(frozen=True)
class WireTensor:
    """An ivl.common.v1.Tensor whose data stays where it is (a numpy array, a Redis value, received bytes)."""

    dtype: str
    shape: tuple[int, ...]
    data: Buffer

    @classmethod
    def from_array(cls, array: np.ndarray, dtype: str) -> WireTensor:
        contiguous = np.asarray(array, order="C").reshape(-1)  # 1-D: a 0-d or empty array casts to bytes too
        return cls(dtype, tuple(int(d) for d in array.shape), memoryview(contiguous.view(np.uint8)))

    @property
    def nbytes(self) -> int:
        return memoryview(self.data).nbytes

    def pieces(self) -> list[Buffer]:
        """The serialized Tensor message as pieces (the data not copied)."""
        name = self.dtype.encode()
        parts: list[Buffer] = []
        if name:
            parts += [length_prefix(_DTYPE, len(name)), name]
        if self.shape:
            packed = b"".join(varint(d) for d in self.shape)
            parts += [length_prefix(_SHAPE, len(packed)), packed]
        if self.nbytes:
            parts += [length_prefix(_DATA, self.nbytes), self.data]
        return parts


def _size(pieces: Sequence[Buffer]) -> int:
    return sum(memoryview(piece).nbytes for piece in pieces)


def submessage(number: int, pieces: Sequence[Buffer]) -> list[Buffer]:
    """Field `number` holding the message serialized as `pieces`."""
    return [length_prefix(number, _size(pieces)), *pieces]


def join(pieces: Sequence[Buffer]) -> bytes:
    """The one copy: all pieces into the bytes handed to gRPC."""
    return b"".join(pieces)


def fields(view: memoryview) -> Iterator[tuple[int, int, Any, int, int]]:
    """(field number, wire type, value, start, end) of each field of one serialized message; length-delimited
    values are memoryviews into `view`, varints ints, fixed values bytes. Raises ValueError on malformed data."""
    position, end = 0, view.nbytes
    while position < end:
        start = position
        key, position = _read_varint(view, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == _WIRE_VARINT:
            value, position = _read_varint(view, position)
        elif wire_type == _WIRE_LEN:
            length, position = _read_varint(view, position)
            if position + length > end:
                raise ValueError("a length-delimited field runs past the end of its message")
            value, position = view[position : position + length], position + length
        elif wire_type in (_WIRE_FIXED64, _WIRE_FIXED32):
            width = 8 if wire_type == _WIRE_FIXED64 else 4
            if position + width > end:
                raise ValueError("a fixed-width field runs past the end of its message")
            value, position = bytes(view[position : position + width]), position + width
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if number < 1:
            raise ValueError("field number 0")
        yield number, wire_type, value, start, position


def _read_varint(view: memoryview, position: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if position >= view.nbytes or shift > 63:
            raise ValueError("a truncated or overlong varint")
        byte = view[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def _without_data(tensor: memoryview) -> tuple[bytes, memoryview]:
    """A Tensor's bytes without its data field (small), and the data as a view."""
    kept: list[memoryview] = []
    data = memoryview(b"")
    for number, wire_type, value, start, stop in fields(tensor):
        if number == _DATA and wire_type == _WIRE_LEN:
            data = value
        else:
            kept.append(tensor[start:stop])
    return b"".join(kept), data


def split_tensors(message_type: Any, raw: Buffer, path: Sequence[int]) -> tuple[Any, list[memoryview]]:
    """Parse `raw` as `message_type`, leaving out the data of the Tensors found along `path` (field numbers:
    e.g. (1, 1) = images[].embedding of EncodeImagesResponse, (2,) = image_embeddings[] of GenerateRequest).
    Returns (the parsed message, whose Tensors have empty data; the data of each Tensor in order, as views
    into `raw`). Malformed bytes raise ValueError."""
    view = memoryview(raw).cast("B")
    datas: list[memoryview] = []

    def rebuild(message: memoryview, depth: int) -> bytes:
        parts: list[Buffer] = []
        for number, wire_type, value, start, stop in fields(message):
            if number == path[depth] and wire_type == _WIRE_LEN:
                if depth + 1 == len(path):
                    small, data = _without_data(value)
                    datas.append(data)
                else:
                    small = rebuild(value, depth + 1)
                parts += [length_prefix(number, len(small)), small]
            else:
                parts.append(message[start:stop])
        return b"".join(parts)

    parsed = message_type.FromString(rebuild(view, 0))
    return parsed, datas


def tensor_array(dtype_name: str, shape: Sequence[int], data: Buffer, what: str) -> np.ndarray:
    """A read-only numpy view of a tensor's data, checked against its dtype (ivl_proto.dtypes) and shape."""
    dtype = numpy_dtype(dtype_name, what)
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise invalid(f"{what} has a negative dimension in shape {list(dims)}")
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    size = memoryview(data).nbytes
    if expected != size:
        raise invalid(f"{what} of shape {list(dims)} and dtype {dtype_name} needs {expected} bytes, got {size}")
    return np.frombuffer(data, dtype=dtype).reshape(dims)
