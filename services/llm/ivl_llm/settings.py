"""The one settings object of the LLM service (env prefix IVL_LLM_), passed explicitly."""

from __future__ import annotations

from typing import Literal

from ivl_proto.dtypes import DtypeName
from ivl_proto.grpc_runtime import DEFAULT_MAX_MESSAGE_BYTES
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class LLMSettings(BaseSettings):
    """Everything the LLM service can be told; `LLMSettings()` reads IVL_LLM_* variables."""

    model_config = SettingsConfigDict(env_prefix="IVL_LLM_", extra="ignore")

    model_path: str = Field("", description="checkpoint folder (original OpenGVLab or transformers-native layout)")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 to accept remote clients")
    port: int = 50052
    auth_token: str = Field("", description="shared secret the gateway must send (x-ivl-internal-token "
                            "metadata); empty = no check. grpc.health.v1 stays open")
    backend: Literal["transformers", "lmdeploy"] = "transformers"
    dtype: DtypeName = "float32"
    device: str = "cpu"
    torch_threads: int = Field(0, ge=0, description="0 keeps torch's default")
    trust_remote_code: bool = Field(
        False, description="let the checkpoint's own tokenizer code run (real InternLM2 checkpoints need it)"
    )
    template: str = Field("", description="override the checkpoint's conversation template name")
    system_message: str | None = Field(None, description="override the template's default system message")
    max_concurrency: int = Field(1, ge=1, description="requests generating at once")
    max_queue: int = Field(8, ge=0, description="requests waiting for a slot before RESOURCE_EXHAUSTED")
    max_n: int = Field(16, ge=1, le=128, description="most choices one request may ask for (OpenAI n)")
    default_max_new_tokens: int = Field(512, ge=1)
    max_new_tokens_limit: int = Field(8192, ge=1)
    context_length: int = Field(0, ge=0, description="0 = the checkpoint's max_position_embeddings")
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, ge=4 * 1024 * 1024)
    grace_s: float = Field(5.0, ge=0)
    warmup: bool = True
    metrics_host: str = Field("", description="address of the Prometheus metrics port; empty = host")
    metrics_port: int = Field(0, ge=0, le=65535, description="HTTP port serving Prometheus metrics; 0 = off")
    otlp_traces_endpoint: str = Field(
        "", description="OTLP/gRPC collector (e.g. http://otel-collector:4317) for OpenTelemetry spans; empty = off")
    prefix_cache_bytes: int = Field(
        1024**3,
        ge=0,
        description="transformers backend: bytes of KV (on the model's device) kept for reuse by later requests "
        "that extend an earlier prompt, e.g. the next turn of a chat; 0 turns reuse off",
    )
    # LMDeploy TurboMind knobs (backend == "lmdeploy").
    tp: int = Field(1, ge=1)
    session_len: int = Field(0, ge=0, description="0 = context_length")
    cache_max_entry_count: float = Field(0.8, gt=0, le=1)
    instances: int = Field(0, ge=0, description="TurboMind engine instances; 0 = max_concurrency")
    enable_prefix_caching: bool = Field(
        True, description="TurboMind prefix caching (reuses KV of text-only requests; see docs/llm.md)"
    )
    cache_prompt: Literal["auto", "all"] = Field("auto", description="TurboMind cache_prompt mode")
    cache_generation: Literal["auto", "all", "none"] = Field("auto", description="TurboMind cache_generation mode")
