"""EncodePipeline (two-stage encode) and the batcher's overlap of staging with the previous forward, on the CPU.

The CUDA parts (pinned buffers, the copy stream and its events, torch.compile / CUDA graphs) run in
bench/gpu_all.sh on a GPU machine; here: the same stage/run split, bucket padding, dtype casts, and the batcher
staging a full waiting batch during a forward (and not a batch that may still grow).
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from ivl_proto.dtypes import float32_to_bfloat16_bits
from ivl_vision.batching import TileBatcher
from ivl_vision.checkpoint import load_vision_encoder
from ivl_vision.encode_pipeline import EncodePipeline, bucket_for, bucket_sizes

SIZE = 448


@pytest.fixture(scope="module")
def encoder(tiny_original):
    return load_vision_encoder(tiny_original)


def tiles(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE), dtype=np.float32)


def test_buckets():
    assert bucket_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert bucket_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert bucket_sizes(1) == [1]
    assert [bucket_for(n, bucket_sizes(24)) for n in (1, 3, 5, 16, 17, 24)] == [1, 4, 8, 16, 24, 24]


def test_stage_then_run_equals_the_encoder(encoder):
    pixels = tiles(3, 1)
    pipeline = EncodePipeline(encoder, "float32", "cpu")
    with torch.inference_mode():
        expected = encoder.encode(torch.from_numpy(pixels)).numpy()
    staged = pipeline.stage(pixels)
    assert staged.tiles == 3 and staged.ready is None
    assert np.array_equal(pipeline.run(staged), expected)
    assert np.array_equal(pipeline(pixels), expected)


def test_padding_to_buckets_changes_nothing(encoder):
    pixels = tiles(3, 2)
    plain = EncodePipeline(encoder, "float32", "cpu")(pixels)
    padded = EncodePipeline(encoder, "float32", "cpu", max_batch_tiles=8, pad_to_buckets=True)
    assert padded.buckets == [1, 2, 4, 8]
    out = padded(pixels)
    assert out.shape == plain.shape
    np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-5)


def test_bfloat16_pixels_and_output_dtype(encoder):
    pixels = float32_to_bfloat16_bits(tiles(2, 3))
    out = EncodePipeline(encoder, "float32", "cpu", output_dtype="bfloat16")(pixels)
    assert out.dtype == np.uint16  # bfloat16 bit patterns
    with torch.inference_mode():
        expected = encoder.encode(torch.from_numpy(pixels).view(torch.bfloat16).float()).to(torch.bfloat16)
    assert np.array_equal(out, expected.view(torch.int16).numpy().view(np.uint16))


class Timeline:
    """A fake two-stage encoder: stage and forward each take `seconds`; records when each began and ended."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.events: list[tuple[str, int, float]] = []
        self.lock = threading.Lock()

    def _note(self, what: str, first_value: float) -> None:
        with self.lock:
            self.events.append((what, int(first_value), time.monotonic()))

    def stage(self, pixels: np.ndarray) -> np.ndarray:
        self._note("stage-start", pixels[0, 0, 0, 0])
        time.sleep(self.seconds / 4)
        self._note("stage-end", pixels[0, 0, 0, 0])
        return pixels

    def run(self, pixels: np.ndarray) -> np.ndarray:
        self._note("forward-start", pixels[0, 0, 0, 0])
        time.sleep(self.seconds)
        self._note("forward-end", pixels[0, 0, 0, 0])
        return np.repeat(pixels[:, :1, :1, :4].reshape(pixels.shape[0], 1, 4), 2, axis=1)

    def at(self, what: str, batch: int) -> float:
        return next(t for w, b, t in self.events if w == what and b == batch)


def marked(count: int, mark: int) -> np.ndarray:
    return np.full((count, 3, 8, 8), float(mark), dtype=np.float32)


async def test_a_full_waiting_batch_is_staged_during_the_forward():
    timeline = Timeline(0.3)
    batcher = TileBatcher(timeline.run, max_batch_tiles=2, max_wait_ms=0, max_queued_tiles=64, stage_fn=timeline.stage)
    try:
        outputs = await asyncio.gather(*(batcher.encode(marked(2, mark)) for mark in (1, 2, 3)))
    finally:
        await batcher.close()
    for mark, out in zip((1, 2, 3), outputs, strict=True):
        assert out.shape == (2 * 2, 4) and np.all(out == mark)  # each request its own rows, in order
    assert batcher.stats.forwards == 3 and batcher.stats.staged_early == 2
    for batch in (2, 3):  # staged while the previous forward ran, and forwards one at a time
        assert timeline.at("stage-end", batch) < timeline.at("forward-end", batch - 1)
        assert timeline.at("forward-start", batch) >= timeline.at("forward-end", batch - 1)


async def test_a_batch_that_may_still_grow_waits_for_the_forward():
    timeline = Timeline(0.3)
    batcher = TileBatcher(timeline.run, max_batch_tiles=4, max_wait_ms=0, max_queued_tiles=64, stage_fn=timeline.stage)
    try:
        first = asyncio.ensure_future(batcher.encode(marked(4, 1)))
        await asyncio.sleep(0.1)  # the first forward is running
        late = [asyncio.ensure_future(batcher.encode(marked(1, mark))) for mark in (2, 3, 4)]
        await asyncio.gather(first, *late)
    finally:
        await batcher.close()
    assert batcher.stats.staged_early == 0
    assert batcher.stats.forwards == 2 and batcher.stats.max_batch_seen == 4  # the three late ones share a forward
