"""numpy arrays <-> ivl.common.v1.Tensor (raw little-endian bytes + dtype + shape).

The dtypes are ivl_proto.dtypes' table: bfloat16 has no numpy dtype, it travels as its 16-bit pattern and
is exposed as uint16 here (ivl_proto.dtypes.to_torch views it back as bfloat16). The hops that carry
embeddings write and read Tensors without protobuf's copies (ivl_proto.tensor_wire); these helpers are the
plain way.
"""

from __future__ import annotations

import numpy as np

from ivl_proto.common.v1 import common_pb2
from ivl_proto.dtypes import WireDtype, wire_dtype
from ivl_proto.tensor_wire import Buffer, WireTensor, tensor_array


def _checked(array: np.ndarray, dtype: str | None) -> WireDtype:
    return wire_dtype(dtype or str(array.dtype))


def tensor_to_pb(array: np.ndarray, dtype: str | None = None) -> common_pb2.Tensor:
    """Pack an array; dtype must be given as "bfloat16" for a uint16 bit-pattern array."""
    spec = _checked(array, dtype)
    data = np.ascontiguousarray(array, dtype=spec.numpy)
    return common_pb2.Tensor(dtype=spec.name, shape=list(array.shape), data=data.tobytes())


def tensor_to_wire(array: np.ndarray, dtype: str | None = None) -> WireTensor:
    """The array as a Tensor to write with ivl_proto.tensor_wire (its data not copied)."""
    spec = _checked(array, dtype)
    return WireTensor.from_array(np.asarray(array, dtype=spec.numpy, order="C"), spec.name)


def tensor_from_pb(tensor: common_pb2.Tensor, what: str = "tensor", data: Buffer | None = None) -> np.ndarray:
    """Unpack and validate a Tensor message (dtype known, byte count matching the shape). `data`: the tensor's
    bytes when they were kept out of the message (tensor_wire.split_tensors), viewed without a copy."""
    return tensor_array(tensor.dtype, tensor.shape, tensor.data if data is None else data, what)
