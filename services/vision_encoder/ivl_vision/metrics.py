"""Prometheus metrics of one vision service (prefix `vision_`), in a registry of its own, served on
`metrics_port` with every series labelled model_name (ivl_proto.metrics_runtime).

Read at scrape time from the service (so they never drift): `vision_queued_tiles` (tiles waiting for an encoder
forward: the autoscaling signal of deploy/k8s), forwards and tiles encoded (rate = tiles/s), requests refused
for a full queue, and the sandboxed decode workers' counters (VisionService.decode_info()): tasks, refusals by
reason (cpu_limit, wall_limit, cancel, crash), recycles, busy workers, pixels in flight, budget waits.
Observed per forward (TileBatcher's on_forward) and per EncodeImages call: batch size, forward time, request
time, images and tiles per request, preprocess time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ivl_proto.metrics_runtime import LATENCY_BUCKETS, ModelNameRegistry, new_registry
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ivl_vision.service import VisionService

TILE_BUCKETS = (1, 2, 4, 8, 13, 16, 24, 32, 48, 64, 96, 128, 256)
IMAGE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)


class _ServiceCollector(Collector):
    """The service's own counters and gauges, read when Prometheus scrapes."""

    def __init__(self, metrics: VisionMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        service = self._metrics.service
        batching = service.batching_info() if service is not None else None
        decode = service.decode_info() if service is not None else None
        queued = GaugeMetricFamily("vision_queued_tiles", "Tiles accepted and waiting for an encoder forward")
        queued.add_metric([], batching.queued_tiles if batching else 0)
        yield queued
        if batching is None or decode is None:
            return
        stats = batching.stats
        for name, doc, value in (
            ("vision_forwards", "Encoder forwards run", stats.forwards),
            ("vision_tiles_encoded", "Tiles encoded (rate() = tiles/s)", stats.tiles_encoded),
            ("vision_rejected_requests", "Requests refused because the tile queue was full", stats.rejected_requests),
            ("vision_failed_forwards", "Encoder forwards that failed", stats.failed_forwards),
            ("vision_decode_tasks", "Tasks run by the sandboxed decode workers", decode.pool.tasks),
            ("vision_decode_worker_recycles", "Decode workers replaced after a memory-heavy task", decode.pool.recycles),
            ("vision_decode_budget_waits", "Images that waited for the decoded-pixel budget", decode.budget.waits),
            ("vision_decode_budget_timeouts", "Images refused after waiting too long for the pixel budget",
             decode.budget.timeouts),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], value)
            yield counter
        refusals = CounterMetricFamily("vision_decode_refusals", "Image decodes ended by the sandbox, by reason",
                                       labels=["reason"])
        for reason, value in (("cpu_limit", decode.pool.cpu_kills), ("wall_limit", decode.pool.wall_kills),
                              ("cancel", decode.pool.cancel_kills), ("crash", decode.pool.crashes)):
            refusals.add_metric([reason], value)
        yield refusals
        for name, doc, value in (
            ("vision_decode_workers", "Sandboxed decode worker processes", decode.workers),
            ("vision_decode_workers_busy", "Decode workers working now", decode.busy_workers),
            ("vision_decode_pixels_in_flight", "Decoded pixels of the images being decoded now", decode.pixels_in_flight),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], value)
            yield gauge


class VisionMetrics:
    def __init__(self) -> None:
        self.registry = r = new_registry()
        self.service: VisionService | None = None
        self.exposed = ModelNameRegistry(r, lambda: self.service.model.model_id if self.service is not None else "")
        r.register(_ServiceCollector(self))
        self.batch_tiles = Histogram("vision_batch_size_tiles", "Tiles in one encoder forward", buckets=TILE_BUCKETS,
                                     registry=r)
        self.forward_seconds = Histogram("vision_forward_seconds", "Time of one encoder forward",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("vision_request_seconds", "EncodeImages time in the service (decode, queue, "
                                         "forwards)", buckets=LATENCY_BUCKETS, registry=r)
        self.preprocess_seconds = Histogram("vision_preprocess_seconds", "Header probes + decode + tiling of a request",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.request_images = Histogram("vision_request_images", "Images per EncodeImages", buckets=IMAGE_BUCKETS,
                                        registry=r)
        self.request_tiles = Histogram("vision_request_tiles", "Tiles per EncodeImages", buckets=TILE_BUCKETS,
                                       registry=r)
        self.requests = Counter("vision_requests", "EncodeImages calls by outcome (ok or an error code)", ["outcome"],
                                registry=r)

    def attach(self, service: VisionService) -> None:
        self.service = service

    def forward(self, tiles: int, seconds: float) -> None:
        self.batch_tiles.observe(tiles)
        self.forward_seconds.observe(seconds)
