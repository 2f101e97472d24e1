"""What the HTTP and gRPC edges of one gateway share: API keys, the per-client rate limit, the request-bytes
budget, the log throttle and the metrics. Built once per gateway (no globals)."""

from __future__ import annotations

from dataclasses import dataclass

from ivl_proto.errors import ErrorCode, ServingError

from ivl_gateway.auth import ApiKeys
from ivl_gateway.log_throttle import LogThrottle
from ivl_gateway.metrics import GatewayMetrics
from ivl_gateway.rate_limit import ClientRateLimit
from ivl_gateway.request_budget import ByteBudget
from ivl_gateway.settings import GatewaySettings

_REASONS = {
    ErrorCode.RESOURCE_EXHAUSTED: "rate_limited",
    ErrorCode.OVERLOADED: "budget_full",
    ErrorCode.UNAUTHENTICATED: "unauthenticated",
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: "unsupported_media_type",
    ErrorCode.PAYLOAD_TOO_LARGE: "too_large",
    ErrorCode.NOT_FOUND: "switched_off",
}


@dataclass
class EdgeState:
    settings: GatewaySettings
    keys: ApiKeys
    rate_limit: ClientRateLimit
    budget: ByteBudget
    throttle: LogThrottle
    metrics: GatewayMetrics

    @classmethod
    def build(cls, settings: GatewaySettings, metrics: GatewayMetrics) -> EdgeState:
        return cls(
            settings=settings,
            keys=ApiKeys(settings.api_keys),
            rate_limit=ClientRateLimit(settings.rate_limit),
            budget=ByteBudget(settings.max_inflight_request_bytes, metrics.request_bytes_in_flight),
            throttle=LogThrottle(settings.log_throttle_s),
            metrics=metrics,
        )

    def refused(self, api: str, error: ServingError) -> None:
        """Count a request refused at the edge (gateway_edge_refusals_total{api, reason})."""
        self.metrics.edge_refusals.labels(api=api, reason=_REASONS.get(error.code, error.code.value)).inc()
