"""The encoder forward in two stages, so that on a GPU a batch's host-to-device copy overlaps the previous forward.

- `stage(pixels)` (the batcher's stage thread): on CUDA the pixels are copied into one of two pinned host buffers
  and sent to the device with a non-blocking copy on a copy stream of their own, an event marking its end; on a
  CPU the array is just viewed as a tensor.
- `run(staged)` (the batcher's forward thread): the compute stream waits for that event (not the host), casts to
  the compute dtype, runs the encoder, casts the output to the embedding dtype on the device and copies it back.
- `compile`: "off", or a torch.compile mode ("default", "reduce-overhead" = CUDA graphs, "max-autotune"); batches
  are then padded to a few bucket sizes (1, 2, 4, ... up to the batch budget) so only those shapes are compiled
  (and captured), and warm_up() compiles each one before the service reports SERVING.
`EncodePipeline(...)(pixels)` is stage + run in one call (what the batcher calls without a stage thread).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ivl_proto.dtypes import from_torch, to_torch, torch_dtype

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def bucket_sizes(max_batch_tiles: int) -> list[int]:
    """1, 2, 4, ... and the budget itself: the batch shapes a compiled encoder sees."""
    sizes, size = [], 1
    while size < max_batch_tiles:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_tiles]


def bucket_for(tiles: int, buckets: list[int]) -> int:
    for size in buckets:
        if size >= tiles:
            return size
    return tiles  # a batch over the budget is not padded (the batcher never makes one)


@dataclass
class Staged:
    tensor: torch.Tensor  # pixels on the device (or the CPU view)
    tiles: int
    ready: Any = None  # a torch.cuda.Event the forward waits for (CUDA only)


class _PinnedBuffer:
    def __init__(self, capacity: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.tensor = torch.empty((capacity, *shape), dtype=dtype, pin_memory=True)
        self.copied: Any = None  # event of the last copy out of this buffer


class EncodePipeline:
    """Two-stage encode of (N, 3, S, S) pixel batches (float32 / float16 / bfloat16 bit patterns as uint16)."""

    def __init__(
        self, encoder: Any, dtype: str, device: str, output_dtype: str | None = None, max_batch_tiles: int = 32,
        compile_mode: str = "off", pin_memory: bool | None = None, pad_to_buckets: bool | None = None,
    ) -> None:
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile mode {compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")
        self.encoder = encoder
        self.dtype = torch_dtype(dtype)
        self.output_dtype = torch_dtype(output_dtype or dtype)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pin = self.cuda if pin_memory is None else (pin_memory and self.cuda)
        self.max_batch_tiles = max_batch_tiles
        self.compile_mode = compile_mode
        pad = compile_mode != "off" if pad_to_buckets is None else pad_to_buckets
        self.buckets = bucket_sizes(max_batch_tiles) if pad else []
        self._forward = encoder.encode
        if compile_mode != "off":
            module = torch.compile(encoder, mode=compile_mode, dynamic=False)
            self._forward = lambda pixels: module(pixels.to(device=self.device, dtype=self.dtype))
        self._buffers: list[_PinnedBuffer] = []
        self._next = 0
        self._lock = threading.Lock()
        self._copy_stream = torch.cuda.Stream(device=self.device) if self.cuda else None

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.run(self.stage(pixels))

    def _host_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        return to_torch(pixels)  # uint16 = bf16 bit patterns, viewed as bfloat16 (no copy)

    def _buffer(self, tensor: torch.Tensor) -> _PinnedBuffer:
        """The next of two pinned buffers, once its previous copy to the device has finished."""
        with self._lock:
            shape, dtype = tuple(tensor.shape[1:]), tensor.dtype
            if not self._buffers or self._buffers[0].tensor.shape[1:] != shape or self._buffers[0].tensor.dtype != dtype:
                capacity = max(self.max_batch_tiles, tensor.shape[0])
                self._buffers = [_PinnedBuffer(capacity, shape, dtype) for _ in range(2)]
            buffer = self._buffers[self._next % 2]
            self._next += 1
        if buffer.tensor.shape[0] < tensor.shape[0]:
            buffer.tensor = torch.empty((tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True)
        if buffer.copied is not None:
            buffer.copied.synchronize()
        return buffer

    def stage(self, pixels: np.ndarray) -> Staged:
        tensor = self._host_tensor(pixels)
        tiles = int(tensor.shape[0])
        if not self.cuda:
            return Staged(tensor, tiles)
        if not self.pin:
            return Staged(tensor.to(self.device), tiles)
        buffer = self._buffer(tensor)
        host = buffer.tensor[:tiles]
        host.copy_(tensor)
        assert self._copy_stream is not None
        with torch.cuda.stream(self._copy_stream):
            on_device = host.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        buffer.copied = ready
        return Staged(on_device, tiles, ready)

    def run(self, staged: Staged) -> np.ndarray:
        batch = staged.tensor
        with torch.inference_mode():
            if staged.ready is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(staged.ready)  # the device waits for the copy, not the host
                batch.record_stream(stream)  # allocated on the copy stream, used on this one
            batch = batch.to(device=self.device, dtype=self.dtype)
            if self.buckets:
                padded = bucket_for(staged.tiles, self.buckets)
                if padded > staged.tiles:
                    batch = torch.cat([batch, batch.new_zeros((padded - staged.tiles, *batch.shape[1:]))])
            output = self._forward(batch)[: staged.tiles].detach().to(dtype=self.output_dtype).to("cpu")
        return from_torch(output)

    def warm_up(self, image_size: int, pixel_dtype: np.dtype) -> None:
        """One forward per batch shape the encoder will see (each bucket when compiled, else one tile)."""
        for tiles in self.buckets or [1]:
            started = time.perf_counter()
            self(np.zeros((tiles, 3, image_size, image_size), dtype=pixel_dtype))
            if self.buckets:
                log.info("compiled the vision encoder (%s) for batches of %d tiles in %.1f s", self.compile_mode,
                         tiles, time.perf_counter() - started)
