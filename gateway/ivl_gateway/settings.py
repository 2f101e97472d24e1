"""GatewaySettings: every knob of the gateway, read from IVL_GATEWAY_* variables or passed explicitly."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MAX_TILES_LIMIT = 40


def _split_list(value: object) -> object:
    """Accept "a,b", "a b", a JSON-ish list string or a real list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1].replace('"', "").replace("'", "")
        return [part.strip() for part in text.replace(" ", ",").split(",") if part.strip()]
    return value


class GatewaySettings(BaseSettings):
    """Settings of the gateway (env prefix IVL_GATEWAY_). Lists take comma-separated values."""

    model_config = SettingsConfigDict(env_prefix="IVL_GATEWAY_", extra="ignore")

    # Downstream services: host:port entries, or "dns:NAME:PORT" to re-resolve a DNS name to replicas.
    vision_addresses: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["127.0.0.1:50051"])
    llm_addresses: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["127.0.0.1:50052"])
    # Redis embedding cache; empty = no cache.
    redis_url: str = ""
    cache_namespace: str = "ivl:emb:v1"
    cache_ttl_s: int = Field(default=24 * 3600, ge=1)
    redis_timeout_s: float = Field(default=1.0, gt=0)
    redis_retry_s: float = Field(default=2.0, ge=0)  # after a Redis failure, skip it this long
    # Listeners.
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=50050, ge=0, le=65535)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    # Optional API keys (Bearer on HTTP, "authorization: Bearer KEY" or "x-api-key" metadata on gRPC).
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Limits.
    max_request_bytes: int = Field(default=64 * 2**20, ge=1024)
    max_images_per_request: int = Field(default=16, ge=1)
    max_image_pixels: int = Field(default=80_000_000, ge=1)
    max_tiles_per_request: int = Field(default=96, ge=1)
    max_text_chars: int = Field(default=200_000, ge=1)
    # Deadlines of downstream calls (seconds).
    vision_timeout_s: float = Field(default=300.0, gt=0)
    llm_timeout_s: float = Field(default=600.0, gt=0)
    info_timeout_s: float = Field(default=5.0, gt=0)
    health_interval_s: float = Field(default=2.0, gt=0)
    replica_backoff_s: float = Field(default=2.0, ge=0)
    dns_refresh_s: float = Field(default=10.0, gt=0)
    # Tiling: None = the vision service's defaults.
    default_max_tiles: int | None = Field(default=None, ge=1, le=MAX_TILES_LIMIT)
    default_use_thumbnail: bool | None = None
    # http(s) image URLs (data: URLs are always accepted).
    allow_url_fetch: bool = False
    url_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    url_max_bytes: int = Field(default=20 * 2**20, ge=1)
    url_timeout_s: float = Field(default=10.0, gt=0)
    allow_private_urls: bool = False  # only for tests on loopback; never in production
    # Misc.
    model_name: str = ""  # the model id /v1/models reports; empty = the LLM service's model id
    # Info.tiny_random_model (the UI's "replies are noise" banner): None = what the LLM service says
    # (its Info.random_weights, from the checkpoint's config.json marker written by ivl_tiny).
    tiny_random_model: bool | None = None
    max_message_bytes: int = 512 * 1024 * 1024
    grace_s: float = Field(default=5.0, ge=0)

    @field_validator("vision_addresses", "llm_addresses", "api_keys", "url_allowed_hosts", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        if not self.vision_addresses:
            raise ValueError("vision_addresses is empty: give at least one host:port of a vision service")
        if not self.llm_addresses:
            raise ValueError("llm_addresses is empty: give at least one host:port of an LLM service")
        return self
