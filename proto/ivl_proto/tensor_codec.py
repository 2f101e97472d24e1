"""numpy arrays <-> ivl.common.v1.Tensor (raw little-endian bytes + dtype + shape).

bfloat16 has no numpy dtype: it travels as its 16-bit pattern and is exposed as uint16 here;
torch users view it back with `torch.from_numpy(a).view(torch.bfloat16)`.
"""

from __future__ import annotations

import numpy as np

from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import invalid

_NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}

SUPPORTED_DTYPES = tuple(_NUMPY_DTYPES)


def tensor_to_pb(array: np.ndarray, dtype: str | None = None) -> common_pb2.Tensor:
    """Pack an array; dtype must be given as "bfloat16" for a uint16 bit-pattern array."""
    name = dtype or str(array.dtype)
    if name not in _NUMPY_DTYPES:
        raise invalid(f"tensor dtype {name!r} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    data = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[name])
    return common_pb2.Tensor(dtype=name, shape=list(array.shape), data=data.tobytes())


def tensor_from_pb(tensor: common_pb2.Tensor, what: str = "tensor") -> np.ndarray:
    """Unpack and validate a Tensor message (dtype known, byte count matching the shape)."""
    if tensor.dtype not in _NUMPY_DTYPES:
        raise invalid(
            f"{what} has dtype {tensor.dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}"
        )
    dtype = _NUMPY_DTYPES[tensor.dtype]
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise invalid(f"{what} has a negative dimension in shape {list(shape)}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected != len(tensor.data):
        raise invalid(
            f"{what} of shape {list(shape)} and dtype {tensor.dtype} needs {expected} bytes, "
            f"got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
