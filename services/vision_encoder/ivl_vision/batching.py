"""Dynamic batching of encoder forwards across concurrent requests, under a tile budget.

Requests submit (N, 3, S, S) pixel arrays. One worker task gathers pending tiles (oldest first)
until the tile budget is full or the oldest request has waited `max_wait_ms`, runs ONE forward in
a worker thread (torch releases the GIL, so the event loop keeps serving), and hands each request
its rows back. A request larger than the budget is split over several forwards; its pieces come
back in order. Cancelled requests are dropped before their forward; a failing forward fails only
the requests that had tiles in it.

Overlap: with a `stage_fn` (the GPU path of ivl_vision.encode_pipeline: pixels into pinned memory and an
asynchronous copy to the device), a full batch that is already waiting when a forward starts is taken and staged
at once, in a thread of its own, so its host-to-device copy runs during the previous forward; forwards still run
one at a time, in order. A batch that is not full waits for the forward as before (it may still grow).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ivl_proto.errors import ErrorCode, ServingError

log = logging.getLogger(__name__)

EncodeFn = Callable[[Any], np.ndarray]
StageFn = Callable[[np.ndarray], Any]


@dataclass
class BatcherStats:
    """Counters since start (read by tests, Info and metrics)."""

    forwards: int = 0
    staged_early: int = 0  # batches taken and staged while the previous forward ran (overlap)
    tiles_encoded: int = 0
    max_batch_seen: int = 0
    requests: int = 0
    failed_forwards: int = 0
    rejected_requests: int = 0
    cancelled_requests: int = 0


@dataclass(eq=False)
class _Job:
    pixels: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued_at: float
    next_tile: int = 0
    done_tiles: int = 0
    outputs: list[np.ndarray] = field(default_factory=list)

    @property
    def num_tiles(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def untaken(self) -> int:
        return self.num_tiles - self.next_tile


@dataclass(frozen=True)
class _Piece:
    job: _Job
    start: int
    stop: int


class TileBatcher:
    """Batches tiles of concurrent requests into shared encoder forwards (see module docstring).

    encode_fn maps (T, 3, S, S) pixels to (T, tokens_per_tile, hidden) and runs in a thread.
    With batching=False every forward holds one request's tiles (still split by the budget) and
    nothing waits: the baseline of the batching benchmark.
    """

    def __init__(
        self,
        encode_fn: EncodeFn,
        max_batch_tiles: int,
        max_wait_ms: float,
        max_queued_tiles: int,
        batching: bool = True,
        stage_fn: StageFn | None = None,
        on_forward: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch_tiles < 1 or max_queued_tiles < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_tiles and max_queued_tiles must be >= 1 and max_wait_ms >= 0")
        self._encode_fn = encode_fn
        self._stage_fn = stage_fn
        self.max_batch_tiles = max_batch_tiles
        self.max_wait_s = max_wait_ms / 1000.0 if batching else 0.0
        self.max_queued_tiles = max_queued_tiles
        self.batching = batching
        self._on_forward = on_forward  # (tiles, seconds) after each successful forward (metrics)
        self.stats = BatcherStats()
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_tiles = 0
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._in_flight: list[_Piece] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ivl-encode")
        self._stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ivl-stage") if stage_fn else None
        self._closed = False

    @property
    def queued_tiles(self) -> int:
        """Tiles accepted but not yet taken into a forward."""
        return self._queued_tiles

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="ivl-tile-batcher")

    async def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Encode one image's tiles; returns (N * tokens_per_tile, hidden) rows in tile order."""
        (rows,) = await self.encode_many([pixels])
        return rows

    async def encode_many(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Encode several images' tiles, admitted together (all or none); rows per image, in order.

        If one image fails or the caller is cancelled, the others' untaken tiles leave the queue.
        """
        for pixels in images:
            if pixels.ndim != 4 or pixels.shape[0] < 1:
                raise ServingError(ErrorCode.INTERNAL, f"expected (N>=1, 3, S, S) pixels, got shape {pixels.shape}")
        if not images:
            return []
        if self._closed:
            raise ServingError(ErrorCode.UNAVAILABLE, "the vision encoder is shutting down; retry on another replica")
        self.start()
        tiles = sum(int(pixels.shape[0]) for pixels in images)
        if self._queued_tiles + tiles > self.max_queued_tiles:
            self.stats.rejected_requests += 1
            raise ServingError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"the vision encoder is overloaded: {self._queued_tiles} tiles are queued and this request "
                f"adds {tiles}; the limit is {self.max_queued_tiles} (IVL_VISION_MAX_QUEUED_TILES). "
                "Retry later or send fewer tiles.",
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        jobs = [_Job(pixels, loop.create_future(), now) for pixels in images]
        self._queue.extend(jobs)
        self._queued_tiles += tiles
        self.stats.requests += len(jobs)
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        except BaseException as error:
            cancelled = isinstance(error, asyncio.CancelledError)
            for job in jobs:
                self._abandon(job, cancelled)
            raise

    async def close(self) -> None:
        """Stop the worker, fail whatever still waits with UNAVAILABLE, release the thread."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        stopped = ServingError(ErrorCode.UNAVAILABLE, "the vision encoder stopped before encoding this request")
        for job in [*self._queue, *(piece.job for piece in self._in_flight)]:
            if not job.future.done():
                job.future.set_exception(stopped)
        self._queue.clear()
        self._in_flight = []
        self._queued_tiles = 0
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._stager is not None:
            self._stager.shutdown(wait=True, cancel_futures=True)

    def _abandon(self, job: _Job, cancelled: bool) -> None:
        """Take a job's untaken tiles out of the queue now (pieces already running finish)."""
        if not job.future.done():
            job.future.cancel()
        if job in self._queue:
            self._queue.remove(job)
            self._queued_tiles -= job.untaken
            job.next_tile = job.num_tiles
            if cancelled:
                self.stats.cancelled_requests += 1

    async def _run(self) -> None:
        running: asyncio.Task[None] | None = None  # the forward under way
        try:
            while True:
                if running is not None and running.done():
                    running = None
                if not self._queue:
                    if running is not None:
                        waiter = asyncio.ensure_future(self._wakeup.wait())
                        await asyncio.wait({running, waiter}, return_when=asyncio.FIRST_COMPLETED)
                        waiter.cancel()
                    else:
                        self._wakeup.clear()
                        await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                if running is not None and self._queued_tiles < self.max_batch_tiles:
                    await running  # no full batch waits: the next one may still grow during this forward
                    continue
                if running is None:
                    await self._wait_for_batch()
                pieces = self._take_batch()
                if not pieces:
                    continue
                staged = self._stage(pieces)
                if running is not None:
                    self.stats.staged_early += 1
                    await running  # forwards run one at a time, in order
                self._in_flight = [*self._in_flight, *pieces]
                running = asyncio.ensure_future(self._forward(pieces, staged))
        finally:
            if running is not None and not running.done():
                running.cancel()

    def _stage(self, pieces: list[_Piece]) -> asyncio.Future[Any]:
        """The batch's pixels, staged for its forward (stage_fn in the stage thread, when there is one)."""
        first = pieces[0]
        batch = (first.job.pixels[first.start : first.stop] if len(pieces) == 1
                 else np.concatenate([p.job.pixels[p.start : p.stop] for p in pieces], axis=0))
        loop = asyncio.get_running_loop()
        if self._stage_fn is None or self._stager is None:
            future: asyncio.Future[Any] = loop.create_future()
            future.set_result(batch)
            return future
        return asyncio.ensure_future(loop.run_in_executor(self._stager, self._stage_fn, batch))

    async def _wait_for_batch(self) -> None:
        """Wait until the budget is full or the oldest waiting request's window has passed."""
        while self._queue and self._queued_tiles < self.max_batch_tiles:
            remaining = self._queue[0].enqueued_at + self.max_wait_s - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Piece]:
        pieces: list[_Piece] = []
        budget = self.max_batch_tiles
        while self._queue and budget > 0:
            job = self._queue[0]
            if job.future.done():  # cancelled or failed with an earlier piece
                self._queue.popleft()
                self._queued_tiles -= job.untaken
                continue
            if pieces and not self.batching:
                break
            take = min(job.untaken, budget)
            pieces.append(_Piece(job, job.next_tile, job.next_tile + take))
            job.next_tile += take
            budget -= take
            self._queued_tiles -= take
            if job.untaken == 0:
                self._queue.popleft()
        return pieces

    async def _forward(self, pieces: list[_Piece], staged: asyncio.Future[Any]) -> None:
        try:
            await self._forward_staged(pieces, staged)
        finally:
            self._in_flight = [p for p in self._in_flight if p not in pieces]

    async def _forward_staged(self, pieces: list[_Piece], staged: asyncio.Future[Any]) -> None:
        tiles = sum(p.stop - p.start for p in pieces)
        loop = asyncio.get_running_loop()
        try:
            batch = await staged
            started = time.perf_counter()  # the forward alone, not the wait for its staging
            output = await loop.run_in_executor(self._executor, self._encode_fn, batch)
            if output.shape[0] != tiles:
                raise ValueError(f"encoder returned {output.shape[0]} rows for {tiles} tiles")
        except Exception as error:
            self.stats.failed_forwards += 1
            log.exception("encoder forward of %d tiles failed", tiles)
            failure = ServingError(
                ErrorCode.INTERNAL,
                f"the vision encoder forward failed on a batch of {tiles} tiles: {type(error).__name__}: {error}",
            )
            for piece in pieces:
                if not piece.job.future.done():
                    piece.job.future.set_exception(failure)
            return
        self.stats.forwards += 1
        self.stats.tiles_encoded += tiles
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, tiles)
        if self._on_forward is not None:
            self._on_forward(tiles, time.perf_counter() - started)
        offset = 0
        for piece in pieces:
            size = piece.stop - piece.start
            job = piece.job
            job.outputs.append(output[offset : offset + size])
            offset += size
            job.done_tiles += size
            if job.done_tiles == job.num_tiles and not job.future.done():
                rows = job.outputs[0] if len(job.outputs) == 1 else np.concatenate(job.outputs, axis=0)
                job.future.set_result(rows.reshape(-1, rows.shape[-1]))
