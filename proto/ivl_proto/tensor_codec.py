"""numpy arrays <-> ivl.common.v1.Tensor (raw little-endian bytes + dtype + shape).

bfloat16 has no numpy dtype: it travels as its 16-bit pattern and is exposed as uint16 here;
torch users view it back with `torch.from_numpy(a).view(torch.bfloat16)`. The hops that carry embeddings
write and read Tensors without protobuf's copies (ivl_proto.tensor_wire); these helpers are the plain way.
"""

from __future__ import annotations

import numpy as np

from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import invalid
from ivl_proto.tensor_wire import Buffer, WireTensor, tensor_array

_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}

SUPPORTED_DTYPES = tuple(_NUMPY_DTYPES)


def _checked_name(array: np.ndarray, dtype: str | None) -> str:
    name = dtype or str(array.dtype)
    if name not in _NUMPY_DTYPES:
        raise invalid(f"tensor dtype {name!r} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    return name


def tensor_to_pb(array: np.ndarray, dtype: str | None = None) -> common_pb2.Tensor:
    """Pack an array; dtype must be given as "bfloat16" for a uint16 bit-pattern array."""
    name = _checked_name(array, dtype)
    data = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[name])
    return common_pb2.Tensor(dtype=name, shape=list(array.shape), data=data.tobytes())


def tensor_to_wire(array: np.ndarray, dtype: str | None = None) -> WireTensor:
    """The array as a Tensor to write with ivl_proto.tensor_wire (its data not copied)."""
    name = _checked_name(array, dtype)
    return WireTensor.from_array(np.asarray(array, dtype=_NUMPY_DTYPES[name], order="C"), name)


def tensor_from_pb(tensor: common_pb2.Tensor, what: str = "tensor", data: Buffer | None = None) -> np.ndarray:
    """Unpack and validate a Tensor message (dtype known, byte count matching the shape). `data`: the tensor's
    bytes when they were kept out of the message (tensor_wire.split_tensors), viewed without a copy."""
    return tensor_array(tensor.dtype, tensor.shape, tensor.data if data is None else data, what, _NUMPY_DTYPES)
