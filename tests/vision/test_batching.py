"""TileBatcher with the real tiny encoder: shared forwards, splitting, order, overload, cancel, failure."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from ivl_proto.errors import ErrorCode, ServingError
from ivl_vision.batching import TileBatcher
from ivl_vision.checkpoint import load_vision_encoder
from ivl_vision.service import make_encode_fn

SIZE = 448
LONG_WAIT_MS = 10_000.0  # requests wait for the budget to fill; used where a test needs a queue


@pytest.fixture(scope="module")
def encode_fn(tiny_original):
    encoder = load_vision_encoder(tiny_original)
    return make_encode_fn(encoder, "float32", "cpu")


def tiles(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE), dtype=np.float32)


def alone(encode_fn, pixels: np.ndarray) -> np.ndarray:
    out = encode_fn(pixels)
    return out.reshape(-1, out.shape[-1])


async def test_two_concurrent_requests_share_one_forward(encode_fn):
    batcher = TileBatcher(encode_fn, max_batch_tiles=32, max_wait_ms=200, max_queued_tiles=64)
    first, second = tiles(1, 1), tiles(2, 2)
    try:
        out_first, out_second = await asyncio.gather(batcher.encode(first), batcher.encode(second))
    finally:
        await batcher.close()
    assert batcher.stats.forwards == 1
    assert batcher.stats.tiles_encoded == 3
    assert batcher.stats.max_batch_seen == 3
    tokens = out_first.shape[0]
    assert out_second.shape == (2 * tokens, out_first.shape[1])
    np.testing.assert_allclose(out_first, alone(encode_fn, first), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_second, alone(encode_fn, second), rtol=1e-5, atol=1e-5)


async def test_large_request_is_split_by_budget_and_comes_back_in_order(encode_fn):
    batcher = TileBatcher(encode_fn, max_batch_tiles=2, max_wait_ms=0, max_queued_tiles=64)
    big, small = tiles(5, 3), tiles(1, 4)
    try:
        out_big, out_small = await asyncio.gather(batcher.encode(big), batcher.encode(small))
    finally:
        await batcher.close()
    assert batcher.stats.forwards == 3  # 2 + 2 + (1 of big, 1 of small)
    assert batcher.stats.max_batch_seen == 2
    np.testing.assert_allclose(out_big, alone(encode_fn, big), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_small, alone(encode_fn, small), rtol=1e-5, atol=1e-5)


async def test_batching_disabled_runs_one_request_per_forward(encode_fn):
    batcher = TileBatcher(encode_fn, max_batch_tiles=32, max_wait_ms=200, max_queued_tiles=64, batching=False)
    requests = [tiles(1, 10 + i) for i in range(3)]
    try:
        outputs = await asyncio.gather(*(batcher.encode(r) for r in requests))
    finally:
        await batcher.close()
    assert batcher.stats.forwards == 3
    assert batcher.stats.max_batch_seen == 1
    for request, output in zip(requests, outputs, strict=True):
        np.testing.assert_allclose(output, alone(encode_fn, request), rtol=1e-5, atol=1e-5)


async def test_overload_is_resource_exhausted_with_the_numbers(encode_fn):
    batcher = TileBatcher(encode_fn, max_batch_tiles=32, max_wait_ms=LONG_WAIT_MS, max_queued_tiles=4)
    waiting = asyncio.create_task(batcher.encode(tiles(3, 5)))
    await asyncio.sleep(0.05)
    try:
        with pytest.raises(ServingError) as caught:
            await batcher.encode(tiles(2, 6))
        assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
        assert "3 tiles are queued" in caught.value.message and "limit is 4" in caught.value.message
        assert batcher.stats.rejected_requests == 1
        with pytest.raises(ServingError, match="this request adds 2;"):  # several images: all or none
            await batcher.encode_many([tiles(1, 13), tiles(1, 14)])
        assert batcher.queued_tiles == 3
    finally:
        waiting.cancel()
        await batcher.close()


async def test_cancelled_request_is_dropped_before_its_forward(encode_fn):
    batcher = TileBatcher(encode_fn, max_batch_tiles=4, max_wait_ms=LONG_WAIT_MS, max_queued_tiles=64)
    doomed = asyncio.create_task(batcher.encode(tiles(2, 7)))
    await asyncio.sleep(0.05)
    assert batcher.queued_tiles == 2
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert batcher.queued_tiles == 0
    full = tiles(4, 8)  # fills the budget: no waiting
    try:
        out = await asyncio.wait_for(batcher.encode(full), 30)
    finally:
        await batcher.close()
    assert batcher.stats.cancelled_requests == 1
    assert batcher.stats.forwards == 1
    assert batcher.stats.tiles_encoded == 4
    np.testing.assert_allclose(out, alone(encode_fn, full), rtol=1e-5, atol=1e-5)


async def test_failing_forward_fails_only_its_batch(encode_fn):
    batcher = TileBatcher(encode_fn, max_batch_tiles=1, max_wait_ms=0, max_queued_tiles=64)
    good_a, good_b = tiles(1, 9), tiles(1, 10)
    wrong_channels = np.zeros((1, 4, SIZE, SIZE), dtype=np.float32)  # the real encoder rejects it
    try:
        results = await asyncio.gather(
            batcher.encode(good_a), batcher.encode(wrong_channels), batcher.encode(good_b),
            return_exceptions=True,
        )
    finally:
        await batcher.close()
    assert isinstance(results[1], ServingError)
    assert results[1].code is ErrorCode.INTERNAL
    assert "forward failed on a batch of 1 tiles" in results[1].message
    np.testing.assert_allclose(results[0], alone(encode_fn, good_a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(results[2], alone(encode_fn, good_b), rtol=1e-5, atol=1e-5)
    assert batcher.stats.failed_forwards == 1 and batcher.stats.forwards == 2


async def test_closed_batcher_refuses_with_unavailable(encode_fn):
    batcher = TileBatcher(encode_fn, max_batch_tiles=4, max_wait_ms=LONG_WAIT_MS, max_queued_tiles=64)
    pending = asyncio.create_task(batcher.encode(tiles(1, 11)))
    await asyncio.sleep(0.05)
    await batcher.close()
    with pytest.raises(ServingError) as caught:
        await pending
    assert caught.value.code is ErrorCode.UNAVAILABLE
    with pytest.raises(ServingError) as again:
        await batcher.encode(tiles(1, 12))
    assert again.value.code is ErrorCode.UNAVAILABLE


async def test_encode_many_keeps_order_and_drops_the_rest_when_one_image_fails(encode_fn):
    batcher = TileBatcher(encode_fn, max_batch_tiles=8, max_wait_ms=50, max_queued_tiles=64)
    images = [tiles(2, 15), tiles(1, 16), tiles(3, 17)]
    try:
        outputs = await batcher.encode_many(images)
        assert batcher.stats.forwards == 1 and batcher.stats.max_batch_seen == 6
        for image, output in zip(images, outputs, strict=True):
            np.testing.assert_allclose(output, alone(encode_fn, image), rtol=1e-5, atol=1e-5)
        one_tile = TileBatcher(encode_fn, max_batch_tiles=1, max_wait_ms=0, max_queued_tiles=64)
        wrong_channels = np.zeros((1, 4, SIZE, SIZE), dtype=np.float32)
        with pytest.raises(ServingError, match="forward failed"):
            await one_tile.encode_many([wrong_channels, *(tiles(1, 20 + i) for i in range(4))])
        assert one_tile.queued_tiles == 0  # the images behind the failure never ran
        assert one_tile.stats.forwards <= 1
        await one_tile.close()
    finally:
        await batcher.close()
