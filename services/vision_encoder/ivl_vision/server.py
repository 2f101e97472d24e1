"""Lifecycle of the vision encoder gRPC server: build, bind, load + warm up, serve, stop.

`build_server(settings)` returns a VisionServer that tests drive directly (port 0, in-process);
`serve(settings)` is what `python -m ivl_vision` runs (signals, logging). The port is bound and
grpc.health.v1 answers NOT_SERVING before the model loads; SERVING comes after the model is loaded
and one dummy forward has run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ivl_proto import tracing
from ivl_proto.errors import ServingError
from ivl_proto.grpc_runtime import (
    add_health_and_reflection,
    bind,
    graceful_stop,
    new_aio_server,
    set_serving,
    wait_for_stop_signal,
)
from ivl_proto.internal_auth import token_server_interceptors
from ivl_proto.metrics_runtime import MetricsServer
from ivl_proto.request_context import RequestIdServerInterceptor
from ivl_proto.vision.v1 import vision_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from ivl_vision.batching import TileBatcher
from ivl_vision.checkpoint import load_vision_encoder
from ivl_vision.image_io import ImageLimits
from ivl_vision.preprocess import Preprocessor, SandboxLimits
from ivl_vision.service import TORCH_DTYPES, VisionService, make_encode_fn
from ivl_vision.servicer import SERVICE_NAME, VisionEncoderServicer
from ivl_vision.settings import VisionSettings
from ivl_vision.tiling import pixel_numpy_dtype

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
    return load_vision_encoder(settings.model_path, dtype=TORCH_DTYPES[dtype], device=device)


class VisionServer:
    """One gRPC server with its model; start() binds and returns the port, loading runs behind it."""

    def __init__(
        self, settings: VisionSettings, load: LoadEncoder = load_encoder, tracer_provider: TracerProvider | None = None
    ) -> None:
        self.settings = settings
        self._load = load
        self.tracer_provider = tracer_provider or tracing.tracer_provider("ivl-vision", settings.otlp_traces_endpoint)
        self._server = new_aio_server(settings.max_message_bytes, interceptors=[
            *tracing.server_interceptors(self.tracer_provider), *token_server_interceptors(settings.auth_token, "vision"),
            RequestIdServerInterceptor()])
        self._servicer = VisionEncoderServicer()
        vision_pb2_grpc.add_VisionEncoderServicer_to_server(self._servicer, self._server)
        self._health = add_health_and_reflection(self._server, [SERVICE_NAME])
        self._loading: asyncio.Task[VisionService] | None = None
        self.service: VisionService | None = None
        self.port: int | None = None
        self._stopped = False
        self.metrics_server: MetricsServer | None = None

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not started")
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> int:
        """Bind, start answering (health NOT_SERVING), begin loading the model; return the port."""
        await set_serving(self._health, [SERVICE_NAME], False)
        self.port = bind(self._server, self.settings.host, self.settings.port)
        await self._server.start()
        if self.settings.metrics_port and self.metrics_server is None:
            self.metrics_server = MetricsServer.start(
                self._servicer.metrics.exposed, self.settings.metrics_host or self.settings.host, self.settings.metrics_port)
            log.info("vision metrics on port %d", self.metrics_server.port)
        log.info("vision encoder listening on %s (loading %s)", self.address, self.settings.model_path)
        self._loading = asyncio.get_running_loop().create_task(self._load_and_warm(), name="ivl-vision-load")
        return self.port

    async def wait_ready(self, timeout: float | None = None) -> VisionService:
        """Wait for load + warm-up; re-raises a loading failure."""
        if self._loading is None:
            raise RuntimeError("call start() first")
        return await asyncio.wait_for(asyncio.shield(self._loading), timeout)

    async def _load_and_warm(self) -> VisionService:
        settings = self.settings
        started = time.perf_counter()
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        device = settings.resolved_device(torch.cuda.is_available())
        dtype = settings.resolved_dtype(device)
        encoder = await asyncio.to_thread(self._load, settings, device, dtype)
        encode_fn = make_encode_fn(encoder, dtype, device)
        info = encoder.info
        preprocessor = build_preprocessor(settings, dtype)  # pixels in the compute dtype: half the memory at 16 bit
        try:
            await preprocessor.start()
            if settings.warmup:  # one dummy forward, outside the batcher's counters
                size = int(info.image_size)
                await asyncio.to_thread(encode_fn, np.zeros((1, 3, size, size), dtype=pixel_numpy_dtype(dtype)))
        except BaseException:
            await preprocessor.close()
            raise
        batcher = TileBatcher(
            encode_fn, settings.max_batch_tiles, settings.batch_wait_ms, settings.max_queued_tiles,
            batching=settings.batching, on_forward=self._servicer.metrics.forward,
        )
        batcher.start()
        service = VisionService(settings, encoder, preprocessor, batcher,
                                tracer=tracing.tracer_of(self.tracer_provider, "ivl_vision"))
        self.service = service
        self._servicer.attach(service)
        if not self._stopped:
            await set_serving(self._health, [SERVICE_NAME], True)
        log.info(
            "vision encoder SERVING %s (%s, %s on %s, fingerprint %s) after %.1f s",
            info.model_id, info.layout, dtype, device, info.fingerprint, time.perf_counter() - started,
        )
        return service

    async def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, let in-flight calls finish for grace_s, then release the model's pools."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_s if grace_s is None else grace_s
        await graceful_stop(self._server, self._health, grace, on_stopped=self._release)
        tracing.shutdown(self.tracer_provider)
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None

    async def _release(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loading
        if self.service is not None:
            await self.service.batcher.close()
            await self.service.preprocessor.close()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def build_server(
    settings: VisionSettings, load: LoadEncoder = load_encoder, tracer_provider: TracerProvider | None = None
) -> VisionServer:
    return VisionServer(settings, load, tracer_provider)


async def serve(settings: VisionSettings) -> None:
    """Run until SIGTERM/SIGINT; raise if the model cannot be loaded."""
    server = build_server(settings)
    stop_signal = asyncio.create_task(wait_for_stop_signal())
    await asyncio.sleep(0)  # install the signal handlers before loading starts
    await server.start()
    ready = asyncio.create_task(server.wait_ready())
    await asyncio.wait({stop_signal, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        error = ready.exception()
        await server.stop(0)
        stop_signal.cancel()
        if isinstance(error, ServingError):
            raise error
        raise RuntimeError(f"could not load the vision encoder from {settings.model_path}: {error}") from error
    if not stop_signal.done():
        await stop_signal
    log.info("stop signal received; draining for up to %.1f s", settings.grace_s)
    ready.cancel()
    await server.stop()
