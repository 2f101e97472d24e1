"""The vision encoder gRPC server on the shared lifecycle (ivl_proto.server_lifecycle: bind, start, health,
drain, stop): `_load` loads the encoder, starts the decode workers and the batcher and runs one dummy forward
before health turns SERVING; `_release` closes the batcher and the workers.

`build_server(settings)` returns a VisionServer that tests drive directly (port 0, in-process);
`serve(settings)` is what `python -m ivl_vision` runs (signals, logging).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ivl_proto import tracing
from ivl_proto.dtypes import numpy_dtype, torch_dtype
from ivl_proto.grpc_runtime import add_health_and_reflection, new_aio_server
from ivl_proto.internal_auth import token_server_interceptors
from ivl_proto.metrics_runtime import MetricsServer
from ivl_proto.request_context import RequestIdServerInterceptor
from ivl_proto.server_lifecycle import ServerLifecycle, run_until_signal
from opentelemetry.sdk.trace import TracerProvider

from ivl_vision.batching import TileBatcher
from ivl_vision.checkpoint import load_vision_encoder
from ivl_vision.checkpoint_config import declared_dtype
from ivl_vision.encode_pipeline import EncodePipeline
from ivl_vision.image_io import ImageLimits
from ivl_vision.preprocess import Preprocessor, SandboxLimits
from ivl_vision.service import VisionService
from ivl_vision.servicer import SERVICE_NAME, VisionEncoderServicer, add_vision_servicer
from ivl_vision.settings import VisionSettings

log = logging.getLogger(__name__)

LoadEncoder = Callable[[VisionSettings, str, str], Any]


def build_preprocessor(settings: VisionSettings, dtype: str) -> Preprocessor:
    """The sandboxed decode workers with the image limits of the settings (not started)."""
    limits = ImageLimits(
        max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
        apply_exif_orientation=settings.apply_exif_orientation, max_side=settings.max_image_side,
        max_jpeg_scans=settings.max_jpeg_scans,
    )
    sandbox = SandboxLimits(
        workers=settings.preprocess_workers, light_pixels=settings.decode_light_pixels, cpu_s=settings.decode_cpu_s,
        cpu_s_per_megapixel=settings.decode_cpu_s_per_mp, wall_s=settings.decode_wall_s,
        memory_bytes=settings.decode_memory_mb << 20, recycle_rss_bytes=settings.decode_recycle_rss_mb << 20,
    )
    return Preprocessor(limits, dtype=dtype, sandbox=sandbox)


def load_encoder(settings: VisionSettings, device: str, dtype: str) -> Any:
    """Default loader: the checkpoint's vision tower + projector on `device` in `dtype`."""
    return load_vision_encoder(settings.model_path, dtype=torch_dtype(dtype, "IVL_VISION_DTYPE"), device=device)


class VisionServer(ServerLifecycle):
    """One gRPC server with its model; start() binds and returns the port, loading runs behind it."""

    def __init__(
        self, settings: VisionSettings, load: LoadEncoder = load_encoder, tracer_provider: TracerProvider | None = None
    ) -> None:
        self.settings = settings
        self._load_encoder = load
        self.tracer_provider = tracer_provider or tracing.tracer_provider("ivl-vision", settings.otlp_traces_endpoint)
        server = new_aio_server(settings.max_message_bytes, interceptors=[
            *tracing.server_interceptors(self.tracer_provider), *token_server_interceptors(settings.auth_token, "vision"),
            RequestIdServerInterceptor()])
        self._servicer = VisionEncoderServicer()
        add_vision_servicer(self._servicer, server)
        health = add_health_and_reflection(server, [SERVICE_NAME])
        super().__init__("vision encoder", server, health, [SERVICE_NAME], settings.host, settings.port, settings.grace_s)
        self.service: VisionService | None = None
        self.metrics_server: MetricsServer | None = None

    async def _after_start(self) -> None:
        if self.settings.metrics_port and self.metrics_server is None:
            self.metrics_server = MetricsServer.start(
                self._servicer.metrics.exposed, self.settings.metrics_host or self.settings.host, self.settings.metrics_port)
            log.info("vision metrics on port %d", self.metrics_server.port)
        log.info("vision encoder listening on %s (loading %s)", self.address, self.settings.model_path)

    async def _load(self) -> None:
        settings = self.settings
        started = time.perf_counter()
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        device = settings.resolved_device(torch.cuda.is_available())
        dtype = settings.resolved_dtype(device)
        encoder = await asyncio.to_thread(self._load_encoder, settings, device, dtype)
        embedding_dtype = settings.resolved_embedding_dtype(dtype, declared_dtype(Path(settings.model_path)))
        pipeline = EncodePipeline(encoder, dtype, device, embedding_dtype, settings.max_batch_tiles,
                                  compile_mode=settings.compile)
        info = encoder.info
        preprocessor = build_preprocessor(settings, dtype)  # pixels in the compute dtype: half the memory at 16 bit
        try:
            await preprocessor.start()
            if settings.warmup or settings.compile != "off":  # dummy forwards (each compiled shape), outside the counters
                await asyncio.to_thread(pipeline.warm_up, int(info.image_size), numpy_dtype(dtype))
        except BaseException:
            await preprocessor.close()
            raise
        # On a GPU the next full batch is staged (pinned memory, async copy) during the current forward.
        staged = pipeline.cuda
        batcher = TileBatcher(
            pipeline.run if staged else pipeline, settings.max_batch_tiles, settings.batch_wait_ms,
            settings.max_queued_tiles, batching=settings.batching, stage_fn=pipeline.stage if staged else None,
            on_forward=self._servicer.metrics.forward,
        )
        batcher.start()
        service = VisionService(settings, encoder, preprocessor, batcher, embedding_dtype=embedding_dtype,
                                tracer=tracing.tracer_of(self.tracer_provider, "ivl_vision"))
        self.service = service
        self._servicer.attach(service)
        log.info(
            "vision encoder SERVING %s (%s, %s on %s, fingerprint %s) after %.1f s",
            info.model_id, info.layout, dtype, device, info.fingerprint, time.perf_counter() - started,
        )

    async def _release(self) -> None:
        if self.service is not None:
            await self.service.batcher.close()
            await self.service.preprocessor.close()
        tracing.shutdown(self.tracer_provider)
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None


def build_server(
    settings: VisionSettings, load: LoadEncoder = load_encoder, tracer_provider: TracerProvider | None = None
) -> VisionServer:
    return VisionServer(settings, load, tracer_provider)


async def serve(settings: VisionSettings) -> None:
    """Run until SIGTERM/SIGINT; raise if the model cannot be loaded."""
    await run_until_signal(build_server(settings))
