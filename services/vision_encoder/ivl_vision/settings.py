"""Settings of the vision encoder service (env prefix IVL_VISION_), validated at startup.

Nothing is read from the environment at import time: call `ivl_proto.settings_errors.load_settings(VisionSettings,
...)` (or construct `VisionSettings(...)`) where the service starts, and pass the object explicitly.
"""

from __future__ import annotations

import os
from typing import Literal

from ivl_proto import dtypes
from ivl_proto.grpc_runtime import DEFAULT_MAX_MESSAGE_BYTES
from ivl_proto.settings_errors import SettingsError
from ivl_proto.tiling_limits import MAX_TILES_LIMIT
from pydantic import DirectoryPath, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "IVL_VISION_"

DtypeName = Literal["auto"] | dtypes.DtypeName
DeviceName = Literal["auto", "cpu", "cuda"]


class VisionSettings(BaseSettings):
    """Everything the vision encoder service can be told, one field per IVL_VISION_* variable."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    model_path: DirectoryPath = Field(description="checkpoint folder (original OpenGVLab or transformers-native layout)")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 to accept remote clients")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    auth_token: str = Field("", description="shared secret the gateway must send (x-ivl-internal-token "
                            "metadata); empty = no check. grpc.health.v1 stays open")
    dtype: DtypeName = Field(
        "float32", description="compute dtype; auto = bfloat16 on CUDA, float32 on CPU (bf16 is slow on CPUs)"
    )
    embedding_dtype: DtypeName = Field(
        "auto", description="dtype of the embeddings sent (cast on the device, before the copy to the host); auto = "
        "the compute dtype, or the checkpoint's own 16-bit dtype when computing in float32 (never widened)",
    )
    device: DeviceName = Field("cpu", description="cpu, cuda, or auto (cuda when available)")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; unset = torch default")

    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off", description="torch.compile the encoder (reduce-overhead = CUDA graphs); batches are padded to "
        "1, 2, 4, ... MAX_BATCH_TILES tiles and each shape is compiled before SERVING",
    )
    batching: bool = Field(True, description="false = one request per forward, no waiting (benchmarks)")
    max_batch_tiles: int = Field(32, ge=1, le=4096, description="tile budget of one encoder forward")
    batch_wait_ms: float = Field(
        0.0, ge=0, le=10_000,
        description="extra wait for a forward to fill up; 0 = batch what queued while the last forward ran",
    )
    max_queued_tiles: int = Field(
        1024, ge=1, description="tiles waiting for a forward before new requests get RESOURCE_EXHAUSTED"
    )

    max_images_per_request: int = Field(16, ge=1, le=1024)
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="encoded file size limit per image")
    max_image_pixels: int = Field(80_000_000, ge=1, description="width*height limit per image (decompression bombs)")
    apply_exif_orientation: bool = Field(
        True, description="turn photos upright by their EXIF tag; false = exactly the reference's decoding"
    )

    max_tiles: int | None = Field(
        None, ge=1, le=MAX_TILES_LIMIT, description="default max tiles; unset = the checkpoint's max_dynamic_patch"
    )
    min_tiles: int | None = Field(
        None, ge=1, le=MAX_TILES_LIMIT, description="default min tiles; unset = the checkpoint's min_dynamic_patch"
    )
    use_thumbnail: bool | None = Field(None, description="default thumbnail; unset = the checkpoint's use_thumbnail")

    max_image_side: int = Field(
        65535, ge=448, le=1 << 20, description="longest side of an image in pixels (extreme aspect ratios)"
    )
    max_jpeg_scans: int = Field(500, ge=1, description="scans of a (progressive) JPEG; each costs a pass over the image")

    preprocess_workers: int = Field(
        4, ge=1, le=256,
        description="sandboxed worker processes that read headers and decode + tile images (more than cores: "
        "decodes are time-shared, so a small image is not stuck behind large ones)",
    )
    decode_threads: int = Field(
        0, ge=0, le=64,
        description="threads each decode worker resizes and normalises one image with (bands, bit-exact); "
        "0 = auto: min(4, cores)",
    )
    decode_light_pixels: int = Field(
        4_000_000, ge=1, description="the last free decode worker only takes images up to this many pixels"
    )
    decode_cpu_s: float = Field(2.0, gt=0, le=600, description="CPU seconds any image may take to decode and tile ...")
    decode_cpu_s_per_mp: float = Field(
        0.05, ge=0, le=60, description="... plus this many per megapixel (the worker is killed beyond the sum)"
    )
    decode_wall_s: float = Field(
        30.0, gt=0, le=3600, description="wall-clock guard per decode (at least twice its CPU budget)"
    )
    decode_memory_mb: int = Field(
        1024, ge=0, description="address space a decode worker may map beyond its imports; 0 = no limit"
    )
    decode_recycle_rss_mb: int = Field(
        512, ge=0, description="a decode worker whose RSS stays above this after an image is replaced; 0 = never"
    )
    max_decode_pixels_in_flight: int = Field(
        160_000_000, ge=1, description="decoded pixels of all images being decoded at once (memory bound)"
    )
    decode_queue_timeout_s: float = Field(
        30.0, ge=0, description="how long an image may wait for the pixel budget before RESOURCE_EXHAUSTED"
    )
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=4 * 1024 * 1024, le=2**31 - 1)
    grace_s: float = Field(5.0, ge=0, description="seconds in-flight calls get to finish on shutdown")
    metrics_host: str = Field("", description="address of the Prometheus metrics port; empty = host")
    metrics_port: int = Field(0, ge=0, le=65535, description="HTTP port serving Prometheus metrics; 0 = off")
    otlp_traces_endpoint: str = Field(
        "", description="OTLP/gRPC collector (e.g. http://otel-collector:4317) for OpenTelemetry spans; empty = off")
    warmup: bool = Field(True, description="run one dummy forward before reporting SERVING")

    @model_validator(mode="after")
    def _check_consistency(self) -> VisionSettings:
        if self.min_tiles is not None and self.max_tiles is not None and self.min_tiles > self.max_tiles:
            raise ValueError(
                f"min_tiles ({self.min_tiles}) is larger than max_tiles ({self.max_tiles}); "
                f"set {ENV_PREFIX}MIN_TILES <= {ENV_PREFIX}MAX_TILES"
            )
        return self

    def resolved_device(self, cuda_available: bool) -> str:
        """The device to load the model on; 'cuda' asked for without a GPU is an error."""
        if self.device == "auto":
            return "cuda" if cuda_available else "cpu"
        if self.device == "cuda" and not cuda_available:
            raise SettingsError(
                f"{ENV_PREFIX}DEVICE=cuda but no CUDA device is visible; use cpu or auto"
            )
        return self.device

    def resolved_decode_threads(self) -> int:
        """Threads per decode worker: the setting, or min(4, the cores this process may use)."""
        if self.decode_threads:
            return self.decode_threads
        return max(1, min(4, len(os.sched_getaffinity(0))))

    def resolved_embedding_dtype(self, compute: str, checkpoint: str | None) -> str:
        """The dtype embeddings travel in: the setting, else the compute dtype, narrowed to the checkpoint's 16-bit
        dtype when the compute dtype is float32 (a CPU service of a bf16 model sends bf16, half the bytes)."""
        if self.embedding_dtype != "auto":
            return self.embedding_dtype
        if compute == "float32" and checkpoint in ("bfloat16", "float16"):
            return checkpoint
        return compute

    def resolved_dtype(self, device: str) -> str:
        """The compute dtype name: 'auto' becomes bfloat16 on CUDA and float32 on CPU."""
        if self.dtype == "auto":
            return "bfloat16" if device == "cuda" else "float32"
        return self.dtype

