"""Prometheus metrics of one LLM service (named after vLLM's, prefix `llm_`), in a registry of its own;
served on `metrics_port` with every series labelled model_name (ivl_proto.metrics_runtime).

Gauges are read at scrape time from the scheduler and the prefix cache (`watch(service)`), so they can never
drift: `llm_requests_running`, `llm_requests_waiting` (the autoscaling signal of deploy/k8s), the prefix
cache's bytes. Per request: TTFT, inter-token latency, end-to-end latency, time queued, prompt and
generation token histograms, finish reasons, and prefix reuse in tokens (queried = prompt tokens,
hits = prompt tokens whose KV was reused).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ivl_proto.metrics_runtime import (
    LATENCY_BUCKETS,
    TOKEN_COUNT_BUCKETS,
    TOKEN_LATENCY_BUCKETS,
    ModelNameRegistry,
    new_registry,
)
from prometheus_client import Counter, Gauge, Histogram


class RequestUsage(Protocol):
    """What a finished request reports (ivl_llm.service.Usage); a protocol, so metrics never imports the service."""

    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    total_s: float
    cached_prompt_tokens: int
    prefill_s: float


class LLMMetrics:
    def __init__(self) -> None:
        self.registry = r = new_registry()
        self.exposed = ModelNameRegistry(r, lambda: self.model_name)
        self.model_name = ""
        self.ttft = Histogram("llm_time_to_first_token_seconds", "Request arrival to its first token (queue included)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("llm_inter_token_latency_seconds", "Time between two tokens of a request",
                                     buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("llm_e2e_request_latency_seconds", "Request arrival to its last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("llm_request_queue_time_seconds", "Time a request waited for a generation slot",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram("llm_request_prefill_time_seconds",
                                      "Engine time for the prompt tokens not served from the prefix cache",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens_hist = Histogram("llm_request_prompt_tokens", "Prompt tokens per request",
                                            buckets=TOKEN_COUNT_BUCKETS, registry=r)
        self.generation_tokens_hist = Histogram("llm_request_generation_tokens",
                                                "Generated tokens per request (all choices)",
                                                buckets=TOKEN_COUNT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llm_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("llm_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("llm_requests", "Finished requests by finish reason of their first choice "
                                "(stop, length, cancelled, error)", ["finished_reason"], registry=r)
        for reason in ("stop", "length", "cancelled", "error"):
            self.requests.labels(finished_reason=reason)
        self.prefix_queries = Counter("llm_prefix_cache_queries", "Prompt tokens looked up in the prefix KV cache",
                                      registry=r)
        self.prefix_hits = Counter("llm_prefix_cache_hits", "Prompt tokens served from the prefix KV cache "
                                   "(their KV reused, not computed)", registry=r)
        self.running = Gauge("llm_requests_running", "Requests generating now", registry=r)
        self.waiting = Gauge("llm_requests_waiting", "Requests waiting for a generation slot", registry=r)
        self.prefix_bytes = Gauge("llm_prefix_cache_used_bytes", "Bytes of KV held by the prefix cache", registry=r)

    def watch(self, model_name: str, running: Callable[[], float], waiting: Callable[[], float],
              backend: Callable[[], Any]) -> None:
        """Read the gauges at scrape time: requests running and waiting, and the prefix cache of the current backend."""
        self.model_name = model_name
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.prefix_bytes.set_function(lambda: _prefix_used(backend()))

    def token(self, since_previous_s: float | None) -> None:
        if since_previous_s is not None:
            self.inter_token.observe(since_previous_s)

    def request_done(self, usage: RequestUsage, queued_s: float, reasons: Sequence[str]) -> None:
        if usage.completion_tokens:
            self.ttft.observe(usage.time_to_first_token_s)
        self.e2e.observe(usage.total_s)
        self.queue_time.observe(queued_s)
        if usage.prefill_s:
            self.prefill_time.observe(usage.prefill_s)
        self.prompt_tokens_hist.observe(usage.prompt_tokens)
        self.generation_tokens_hist.observe(usage.completion_tokens)
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.generation_tokens.inc(usage.completion_tokens)
        self.prefix_queries.inc(usage.prompt_tokens)
        self.prefix_hits.inc(usage.cached_prompt_tokens)
        self.requests.labels(finished_reason=reasons[0] if reasons else "stop").inc()

    def request_finished(self, outcome: str) -> None:
        """A request that ended without its Finished (cancelled by its caller, or failed)."""
        self.requests.labels(finished_reason=outcome).inc()


def _prefix_used(backend: Any) -> float:
    stats_of = getattr(backend, "cache_stats", None)
    return float(stats_of().used_bytes) if stats_of is not None else 0.0
