"""Prometheus metrics of one gateway, in a registry of its own (no process globals). Every series is labelled
model_name (the served model, learnt from the LLM's Info) when scraped (ivl_proto.metrics_runtime); no
`_created` series."""

from __future__ import annotations

from ivl_proto.common.v1 import common_pb2
from ivl_proto.metrics_runtime import (
    CONTENT_TYPE,
    TOKEN_COUNT_BUCKETS,
    TOKEN_LATENCY_BUCKETS,
    ModelNameRegistry,
    new_registry,
)
from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TILE_BUCKETS = (1, 2, 3, 5, 7, 9, 13, 17, 25, 33, 41)
_RATE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class GatewayMetrics:
    """All the gateway's metrics. `render()` gives the Prometheus text exposition."""

    content_type = CONTENT_TYPE

    def __init__(self, model_name: str = "") -> None:
        self.registry = new_registry()  # the gateway's own metrics (tests read samples here, without model_name)
        self.model_name = model_name  # set from settings.model_name or the LLM's Info
        self.exposed = ModelNameRegistry(self.registry, lambda: self.model_name)
        r = self.registry
        self.requests = Counter(
            "gateway_requests", "Chat requests by API and outcome", ["api", "outcome"], registry=r
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Chat turns being served now, by API (streams until they end or close)",
            ["api"], registry=r,
        )
        for api in ("http", "grpc"):
            self.in_flight.labels(api=api)
        self.request_latency = Histogram(
            "gateway_request_seconds", "Whole chat request time", ["api"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds", "Request start to first text delta",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tokens_per_s = Histogram(
            "gateway_decode_tokens_per_second", "LLM decode speed per request", buckets=_RATE_BUCKETS, registry=r
        )
        self.completion_tokens = Counter("gateway_completion_tokens", "Generated tokens", registry=r)
        self.prompt_tokens = Counter("gateway_prompt_tokens", "Prompt tokens", registry=r)
        self.inter_token = Histogram(
            "gateway_inter_token_latency_seconds", "Time between tokens of a streamed reply, as the gateway sees them",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens_hist = Histogram(
            "gateway_request_prompt_tokens", "Prompt tokens per chat turn", buckets=TOKEN_COUNT_BUCKETS, registry=r
        )
        self.generation_tokens_hist = Histogram(
            "gateway_request_generation_tokens", "Generated tokens per chat turn (all choices)",
            buckets=TOKEN_COUNT_BUCKETS, registry=r,
        )
        self.cached_prompt_tokens = Counter(
            "gateway_cached_prompt_tokens", "Prompt tokens the LLM served from its prefix KV cache", registry=r
        )
        self.cache_hits = Counter("vision_cache_hits", "Images found in the embedding cache", registry=r)
        self.cache_misses = Counter("vision_cache_misses", "Images not in the embedding cache", registry=r)
        self.cache_errors = Counter(
            "vision_cache_errors", "Cache operations that failed (Redis down/slow, corrupt entries)",
            ["kind"], registry=r,
        )
        self.singleflight_waits = Counter(
            "vision_cache_singleflight_waits", "Images that waited for another request's encode", registry=r
        )
        self.lock_waits = Counter(
            "vision_cache_lock_waits", "Images that waited for another gateway's encode (its Redis lock)", registry=r
        )
        self.lock_takeovers = Counter(
            "vision_cache_lock_takeovers",
            "Images whose Redis encode lock was gone without an entry (holder failed or died) and were encoded here",
            registry=r,
        )
        self.encode_latency = Histogram(
            "vision_encode_seconds", "EncodeImages call time (all misses of a request)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.encoded_images = Counter(
            "vision_encoded_images", "Images sent to the vision service to encode (grpc picks the replica; "
            "per-replica counts are each vision service's own)", registry=r
        )
        self.tiles_per_image = Histogram(
            "vision_tiles_per_image", "Tiles per image (thumbnail included)", buckets=_TILE_BUCKETS, registry=r
        )
        # The public edges and the cache's connection pool.
        self.http_connections = Gauge("gateway_http_connections", "Open HTTP connections", registry=r)
        self.http_connections_closed = Counter(
            "gateway_http_connections_closed",
            "HTTP connections the gateway closed itself (idle_timeout, header_timeout, body_timeout, "
            "evicted_idle at the cap, refused_at_cap)", ["reason"], registry=r,
        )
        self.request_bytes_in_flight = Gauge(
            "gateway_request_bytes_in_flight", "Request bytes held now (HTTP bodies + gRPC messages), all requests",
            registry=r,
        )
        self.edge_refusals = Counter(
            "gateway_edge_refusals", "Requests refused at the edge before any work, by API and reason "
            "(rate_limited, budget_full, unauthenticated)", ["api", "reason"], registry=r,
        )
        for api in ("http", "grpc"):  # every series exists from the start (0), so dashboards and alerts see it
            for reason in ("rate_limited", "budget_full", "unauthenticated", "unsupported_media_type", "too_large"):
                self.edge_refusals.labels(api=api, reason=reason)
        self.cache_pool_waits = Counter(
            "vision_cache_pool_waits", "Redis calls that had to wait for a free pooled connection", registry=r
        )
        self.cache_pool_timeouts = Counter(
            "vision_cache_pool_wait_timeouts",
            "Redis calls that found no free connection within redis_pool_wait_s (served as a cache miss)",
            registry=r,
        )

    def observe_inter_token(self, seconds: float, tokens: int) -> None:
        """A delta of `tokens` tokens `seconds` after the previous one: that gap spread over its tokens."""
        for _ in range(max(1, tokens)):
            self.inter_token.observe(seconds / max(1, tokens))

    def observe_usage(self, usage: common_pb2.Usage) -> None:
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.completion_tokens.inc(usage.completion_tokens)
        self.cached_prompt_tokens.inc(usage.cached_prompt_tokens)
        self.prompt_tokens_hist.observe(usage.prompt_tokens)
        self.generation_tokens_hist.observe(usage.completion_tokens)
        if usage.decode_tokens_per_s > 0:
            self.tokens_per_s.observe(usage.decode_tokens_per_s)

    def render(self) -> bytes:
        return self.exposed.render()
