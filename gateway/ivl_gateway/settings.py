"""GatewaySettings: every knob of the gateway, read from IVL_GATEWAY_* variables or passed explicitly."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from ivl_proto.tiling_limits import MAX_TILES_LIMIT
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ivl_gateway.replica_targets import parse_target

# Who may read /metrics, /docs + /openapi.json, and gRPC server reflection: everyone, API-key holders, nobody.
Exposure = Literal["open", "api_key", "off"]


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

    # Downstream services: host:port entries, or one DNS name of several replicas: dns:///NAME:PORT (also
    # dns:NAME:PORT, dns://DNS_SERVER/NAME:PORT). See replica_targets.py and docs/gateway.md "Scale-out".
    vision_addresses: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["127.0.0.1:50051"])
    llm_addresses: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["127.0.0.1:50052"])
    # Redis embedding cache; empty = no cache.
    # redis://[user:password@]host:port/db, rediss://... for TLS; with redis_cluster=true the URL names any
    # node of a Redis Cluster (docs/gateway.md "Redis").
    redis_url: str = ""
    redis_cluster: bool = False
    cache_namespace: str = Field(default="ivl:emb:v1", pattern=r"^[^{}\s]+$")  # braces are cluster hash tags
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
    max_request_bytes: int = Field(default=64 * 2**20, ge=1024)  # one HTTP body / one gRPC request message
    # Request bytes held in memory at once, all requests together (HTTP bodies + gRPC messages); a request
    # that does not fit is refused at once (HTTP 503 + Retry-After, gRPC RESOURCE_EXHAUSTED).
    max_inflight_request_bytes: int = Field(default=256 * 2**20, ge=1024)
    max_images_per_request: int = Field(default=16, ge=1)
    max_image_pixels: int = Field(default=80_000_000, ge=1)
    max_tiles_per_request: int = Field(default=96, ge=1)
    max_text_chars: int = Field(default=200_000, ge=1)
    # Deadlines of downstream calls (seconds).
    vision_timeout_s: float = Field(default=300.0, gt=0)
    llm_timeout_s: float = Field(default=600.0, gt=0)
    info_timeout_s: float = Field(default=5.0, gt=0)
    # Replicas (grpc balances, health-checks and retries; replicas.py): a replica that went away is tried
    # again at most this long after its last failed connection attempt; names are resolved again (and
    # every replica's Info read) every dns_refresh_s; a call that fails UNAVAILABLE before any response is
    # made at most replica_attempts times in all (grpc's limit is 5).
    replica_backoff_s: float = Field(default=2.0, ge=0)
    dns_refresh_s: float = Field(default=10.0, gt=0)
    replica_attempts: int = Field(default=3, ge=1, le=5)
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
    # More names `model` may give (e.g. "gpt-4o" for a client that cannot be configured); listed by /v1/models.
    model_aliases: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # OpenAI fields this server cannot honour are a 400 naming the field; true = drop them instead (named in the
    # response header x-ivl-ignored-fields and the log), for clients that always send some field.
    ignore_unsupported_fields: bool = False
    detail_high_max_tiles: int = Field(default=MAX_TILES_LIMIT, ge=1, le=MAX_TILES_LIMIT)  # image detail "high"
    # OpenTelemetry: spans exported over OTLP/gRPC to this collector (e.g. http://otel-collector:4317); empty = off.
    otlp_traces_endpoint: str = ""
    # Info.tiny_random_model (the UI's "replies are noise" banner): None = what the LLM service says
    # (its Info.random_weights, from the checkpoint's config.json marker written by ivl_tiny).
    tiny_random_model: bool | None = None
    max_message_bytes: int = 512 * 1024 * 1024  # gRPC messages from/to the vision and LLM services (embeddings)
    grace_s: float = Field(default=5.0, ge=0)
    # --- The public edges (docs/gateway.md "Public deployment checklist") -----------------------------
    # HTTP connections (uvicorn + ivl_gateway.http_guard). Deadlines in seconds.
    http_header_timeout_s: float = Field(default=10.0, gt=0)  # connection open (or last response) -> headers
    http_keepalive_timeout_s: float = Field(default=5.0, gt=0)  # an idle keep-alive connection is closed
    http_body_timeout_s: float = Field(default=300.0, gt=0)  # the whole request body
    http_body_idle_timeout_s: float = Field(default=15.0, gt=0)  # no body bytes for this long -> 408
    http_min_body_rate_bytes_s: int = Field(default=32 * 1024, ge=0)  # after the grace period; 0 = off
    http_body_rate_grace_s: float = Field(default=5.0, ge=0)
    http_max_connections: int = Field(default=1000, ge=1)  # at the cap the oldest idle one is closed, else 503
    http_max_requests_per_connection: int = Field(default=1000, ge=1)  # keep-alive reuse limit
    http_max_header_bytes: int = Field(default=32 * 1024, ge=1024)  # request line + headers (h11)
    # gRPC (grpc core's own limits): calls at once (more get RESOURCE_EXHAUSTED), streams per connection,
    # and an idle connection is closed after this long. The handshake deadline is http_header_timeout_s.
    grpc_max_concurrent_rpcs: int = Field(default=512, ge=1)
    grpc_max_concurrent_streams: int = Field(default=64, ge=1)
    grpc_max_connection_idle_s: float = Field(default=300.0, gt=0)
    # Only these browser origins may call the HTTP API cross-site (CORS); empty = CORS off.
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # X-Forwarded-For / X-Forwarded-Proto are believed only from these proxy addresses (empty = never).
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Per-client rate limit in `limits` notation, e.g. "60/minute;10/second" (empty = off). A client is its
    # API key when keys are configured and it sent a valid one, else its IP address. Applies to /v1/* and
    # to ivl.gateway.v1.Chat; refusals are HTTP 429 + Retry-After / gRPC RESOURCE_EXHAUSTED.
    rate_limit: str = ""
    metrics_access: Exposure = "open"
    docs_access: Exposure = "open"
    reflection_access: Exposure = "open"
    access_log: bool = True  # one INFO line per HTTP request (logger ivl_gateway.access)
    log_throttle_s: float = Field(default=60.0, gt=0)  # a repeated warning is logged once per this interval
    # Shared secret sent to the vision and LLM services (their IVL_VISION_AUTH_TOKEN / IVL_LLM_AUTH_TOKEN).
    internal_token: str = ""
    # Redis connection pool: at most this many connections; a request waits at most redis_pool_wait_s for
    # one, then treats its lookup as a miss (a busy pool is not an outage).
    redis_max_connections: int = Field(default=64, ge=1)
    redis_pool_wait_s: float = Field(default=0.25, ge=0)
    # Single flight across gateway processes sharing one Redis: a new image is encoded by one gateway, the
    # others wait for its entry (encode_lock.py). The lock lives encode_lock_ttl_s unless its holder renews
    # it (every third of that while encoding): a gateway that dies holds up the others for at most this long.
    encode_lock: bool = True
    encode_lock_ttl_s: float = Field(default=5.0, ge=0.3)

    @field_validator("vision_addresses", "llm_addresses", "api_keys", "url_allowed_hosts", "cors_allow_origins",
                     "trusted_proxies", "model_aliases", mode="before")
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_list(value)

    @field_validator("vision_addresses", "llm_addresses")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_target(entry)  # ValueError naming the accepted forms
        return value

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        if not self.vision_addresses:
            raise ValueError("vision_addresses is empty: give at least one host:port of a vision service")
        if not self.llm_addresses:
            raise ValueError("llm_addresses is empty: give at least one host:port of an LLM service")
        if self.redis_url:
            parsed = urlsplit(self.redis_url)
            if parsed.scheme not in ("redis", "rediss", "unix") or (parsed.scheme != "unix" and not parsed.hostname):
                raise ValueError(f"redis_url {self.redis_url!r} is not redis://[user:password@]host:port/db, "
                                 "rediss://... (TLS) or unix:///path")
            if self.redis_cluster and (parsed.scheme == "unix" or parsed.path.strip("/") not in ("", "0")):
                raise ValueError(f"redis_url {self.redis_url!r} with redis_cluster=true: a Redis Cluster is "
                                 "reached over TCP and has only database 0 (redis://host:port or .../0)")
        if self.rate_limit:
            from limits import parse_many

            try:
                parse_many(self.rate_limit)
            except ValueError as error:
                raise ValueError(f"rate_limit {self.rate_limit!r} is not in `limits` notation "
                                 f"(e.g. '60/minute;10/second'): {error}") from None
        if self.max_inflight_request_bytes < self.max_request_bytes:
            raise ValueError("max_inflight_request_bytes is smaller than max_request_bytes: no request of the "
                             "largest allowed size could ever be admitted")
        return self
