"""ivl_proto.dtypes: the one dtype table (wire names, numpy storage, torch, binary codes) and the bfloat16 helpers,
checked against torch's own conversions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ivl_proto import dtypes
from ivl_proto.errors import ErrorCode, ServingError


def test_the_table() -> None:
    assert dtypes.DTYPE_NAMES == ("float32", "float16", "bfloat16")
    for name in dtypes.DTYPE_NAMES:
        spec = dtypes.wire_dtype(name)
        assert spec.torch() == getattr(torch, name)
        assert spec.itemsize == torch.empty((), dtype=spec.torch()).element_size()
        assert dtypes.by_code(spec.code) is spec
        assert dtypes.name_of_torch(spec.torch()) == name
        assert dtypes.name_of_array(np.zeros(2, dtype=spec.numpy)) == name
    # the codes are in the gateway's Redis values: they must never change
    assert {name: dtypes.wire_dtype(name).code for name in dtypes.DTYPE_NAMES} == {
        "float32": 1, "float16": 2, "bfloat16": 3}
    assert dtypes.by_code(0) is None and dtypes.by_code(4) is None


@pytest.mark.parametrize("call", [
    lambda: dtypes.wire_dtype("int8", "image embedding 0"),
    lambda: dtypes.numpy_dtype("float64", "image embedding 0"),
    lambda: dtypes.name_of_array(np.zeros(1, np.int64), "image embedding 0"),
    lambda: dtypes.name_of_array(np.zeros(1, ">f4"), "image embedding 0"),  # big-endian storage is not the wire's
    lambda: dtypes.name_of_torch(torch.float64, "image embedding 0"),
])
def test_off_the_table_is_invalid_argument_naming_what(call) -> None:
    with pytest.raises(ServingError) as caught:
        call()
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert "image embedding 0" in caught.value.message and "supported" in caught.value.message


def test_bfloat16_rounding_is_nearest_even_like_torch() -> None:
    samples = np.array(
        [1.0, 1.00390625, 1.01171875, -2.5e-3, 3.0e38, 1e-40, np.inf, -np.inf], dtype=np.float32
    )
    rng = np.random.default_rng(0)
    samples = np.concatenate([samples, rng.normal(0, 3, 10000).astype(np.float32)])
    expected = torch.from_numpy(samples).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(dtypes.float32_to_bfloat16_bits(samples), expected)
    nan = dtypes.float32_to_bfloat16_bits(np.array([np.nan], dtype=np.float32))
    assert np.isnan(dtypes.bfloat16_bits_to_float32(nan)).all()


def test_bfloat16_bits_back_to_float32_exactly() -> None:
    values = torch.randn(4096, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(dtypes.bfloat16_bits_to_float32(bits), values.float().numpy())


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
def test_to_torch_views_read_only_received_bytes(name: str) -> None:
    values = torch.randn(6, 5, generator=torch.Generator().manual_seed(2)).to(getattr(torch, name))
    raw = dtypes.from_torch(values).tobytes()
    received = np.frombuffer(memoryview(raw), dtype=dtypes.numpy_dtype(name)).reshape(6, 5)  # read-only, like the wire
    assert not received.flags.writeable
    tensor = dtypes.to_torch(received, name)
    assert tensor.dtype == values.dtype and torch.equal(tensor, values)
    assert tensor.data_ptr() == received.ctypes.data  # a view, not a copy


def test_to_torch_writable_and_empty_arrays() -> None:
    pixels = dtypes.float32_to_bfloat16_bits(np.linspace(-2, 2, 24, dtype=np.float32).reshape(2, 3, 4))
    tensor = dtypes.to_torch(pixels)  # uint16 storage is taken as bfloat16
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (2, 3, 4)
    pixels[0, 0, 0] = dtypes.float32_to_bfloat16_bits(np.array([7.0], np.float32))[0]
    assert tensor[0, 0, 0].item() == 7.0  # shares the array's memory
    empty = dtypes.to_torch(np.zeros((0, 8), np.uint16), "bfloat16")
    assert empty.shape == (0, 8) and empty.dtype == torch.bfloat16
    with pytest.raises(ServingError, match="cannot be viewed as float32"):
        dtypes.to_torch(np.zeros(4, np.uint16), "float32")


def test_from_torch_round_trips_every_dtype() -> None:
    for name in dtypes.DTYPE_NAMES:
        values = torch.arange(12, dtype=torch.float32).reshape(3, 4).to(getattr(torch, name)).t()  # not contiguous
        array = dtypes.from_torch(values)
        assert array.dtype == dtypes.numpy_dtype(name) and array.shape == (4, 3)
        assert torch.equal(dtypes.to_torch(array, name), values)
