"""The one table of tensor dtypes every service uses: wire names <-> numpy storage <-> torch, plus bfloat16 helpers.

A dtype travels by name ("float32", "float16", "bfloat16": ivl.common.v1.Tensor.dtype, settings, Info). Its
bytes are stored little-endian; numpy has no bfloat16, so a bfloat16 array is its 16-bit pattern as uint16
(torch views it back as bfloat16 without a copy: `to_torch`). Binary formats that need a number for a dtype
(the gateway's Redis values) use `code`, which never changes for a name.

torch is imported only by the torch helpers: the gateway and the protobuf helpers never load it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from ivl_proto.errors import invalid

if TYPE_CHECKING:
    import torch

DtypeName = Literal["float32", "float16", "bfloat16"]


@dataclass(frozen=True)
class WireDtype:
    name: DtypeName
    numpy: np.dtype  # storage of the bytes (bfloat16: uint16 bit patterns)
    code: int  # stable number of the name in binary formats

    @property
    def itemsize(self) -> int:
        return int(self.numpy.itemsize)

    def torch(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.name)
        return dtype


DTYPES: dict[str, WireDtype] = {
    spec.name: spec
    for spec in (
        WireDtype("float32", np.dtype("<f4"), 1),
        WireDtype("float16", np.dtype("<f2"), 2),
        WireDtype("bfloat16", np.dtype("<u2"), 3),
    )
}
DTYPE_NAMES: tuple[DtypeName, ...] = tuple(spec.name for spec in DTYPES.values())
_BY_CODE = {spec.code: spec for spec in DTYPES.values()}
_BY_STORAGE = {spec.numpy.str: spec for spec in DTYPES.values()}


def wire_dtype(name: str, what: str = "tensor") -> WireDtype:
    """The table's entry for `name`; INVALID_ARGUMENT naming `what` for any other name."""
    spec = DTYPES.get(name)
    if spec is None:
        raise invalid(f"{what} has dtype {name!r}; supported: {', '.join(DTYPE_NAMES)}")
    return spec


def by_code(code: int) -> WireDtype | None:
    return _BY_CODE.get(code)


def numpy_dtype(name: str, what: str = "tensor") -> np.dtype:
    """The numpy storage dtype of a name (bfloat16 -> uint16 bit patterns)."""
    return wire_dtype(name, what).numpy


def name_of_array(array: np.ndarray, what: str = "tensor") -> DtypeName:
    """The wire name of an array's storage (uint16 is taken as bfloat16 bit patterns)."""
    spec = _BY_STORAGE.get(array.dtype.str)
    if spec is None:
        raise invalid(f"{what} has numpy dtype {array.dtype}; supported: float32, float16, uint16 (bfloat16 bits)")
    return spec.name


def torch_dtype(name: str, what: str = "tensor") -> torch.dtype:
    return wire_dtype(name, what).torch()


def name_of_torch(dtype: torch.dtype, what: str = "tensor") -> DtypeName:
    for spec in DTYPES.values():
        if spec.torch() == dtype:
            return spec.name
    raise invalid(f"{what} has torch dtype {dtype}; supported: {', '.join(DTYPE_NAMES)}")


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) with round-to-nearest-even, like torch's float -> bfloat16."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    rounded = ((bits + rounding) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # keep NaN a (quiet) NaN instead of rounding it into an infinity
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact: bfloat16 is float32's upper half)."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_torch(array: np.ndarray, name: str | None = None) -> torch.Tensor:
    """A torch tensor over the array's memory (no copy unless it is not C-contiguous), typed as `name`
    (default: the array's own, uint16 = bfloat16). Read-only arrays (views of received bytes) are fine: the
    tensor must then only be read."""
    import torch

    spec = wire_dtype(name or name_of_array(array))
    array = np.ascontiguousarray(array)
    if array.dtype.itemsize != spec.itemsize:
        raise invalid(f"a {array.dtype} array cannot be viewed as {spec.name}")
    if array.size == 0:
        return torch.empty(array.shape, dtype=spec.torch())
    with warnings.catch_warnings():  # torch warns that it cannot make a read-only buffer read-only
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(array, dtype=spec.torch()).reshape(array.shape)


def from_torch(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array over its memory (bfloat16 -> uint16 bit patterns; made contiguous)."""
    import torch

    name = name_of_torch(tensor.dtype)
    tensor = tensor.detach().contiguous()
    if name == "bfloat16":
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()
