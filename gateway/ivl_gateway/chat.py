"""One chat turn end to end, shared by the gRPC and HTTP APIs.

images -> embeddings (cache / vision) -> ImageInfo events -> LLM Generate stream -> deltas -> Final.
Closing the returned stream early (client gone, cancelled) cancels the downstream Generate call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.gateway.v1 import gateway_pb2
from ivl_proto.llm.v1 import llm_pb2
from ivl_proto.request_context import request_id_client_interceptors
from ivl_proto.tensor_wire import WireTensor
from ivl_proto.tiling_limits import MAX_TILES_LIMIT
from ivl_proto.tracing import client_interceptors, tracer_of
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from ivl_gateway.cache import EmbeddingCache
from ivl_gateway.conversation import (
    ChatTurn,
    TurnLimits,
    check_image_bytes,
    collect_images,
    llm_messages,
    resolve_tiling,
)
from ivl_gateway.embedding_codec import TilingChoice
from ivl_gateway.image_embeddings import EmbeddingResolver
from ivl_gateway.llm_client import LLMClient, generate_request_bytes
from ivl_gateway.metrics import GatewayMetrics
from ivl_gateway.settings import GatewaySettings
from ivl_gateway.vision_client import VisionClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    ready: bool
    detail: dict[str, object]


class ChatService:
    """Owns the downstream clients and the cache; `chat(turn)` streams gateway ChatResponse events."""

    def __init__(
        self, settings: GatewaySettings, metrics: GatewayMetrics | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or GatewayMetrics()
        self.tracer = tracer_of(tracer_provider, "ivl_gateway")
        # every downstream call carries the request id and (when tracing) the trace context in its metadata
        interceptors = [*client_interceptors(tracer_provider), *request_id_client_interceptors()]
        self.cache = EmbeddingCache(settings, self.metrics)
        self.vision = VisionClient(settings, self.metrics, interceptors)
        self.llm = LLMClient(settings, interceptors)
        self.resolver = EmbeddingResolver(settings, self.cache, self.vision, self.metrics)
        self.limits = TurnLimits(settings.max_images_per_request, settings.max_text_chars)

    async def start(self) -> None:
        await self.vision.start()
        await self.llm.start()

    async def close(self) -> None:
        await self.vision.close()
        await self.llm.close()
        await self.resolver.close()
        await self.cache.close()

    async def default_tiling(self) -> tuple[TilingChoice, int]:
        info = await self.vision.info()
        d = info.default_tiling
        limit = info.max_tiles_limit or MAX_TILES_LIMIT
        max_tiles = self.settings.default_max_tiles or (d.max_tiles if d.HasField("max_tiles") else 12)
        thumb = self.settings.default_use_thumbnail
        if thumb is None:
            thumb = d.use_thumbnail if d.HasField("use_thumbnail") else True
        min_tiles = d.min_tiles if d.HasField("min_tiles") else 1
        return TilingChoice(min(max_tiles, limit), min(min_tiles, max_tiles), thumb), limit

    async def chat(self, turn: ChatTurn, api: str = "grpc") -> AsyncGenerator[gateway_pb2.ChatResponse, None]:
        """The turn's events; counted in gateway_requests_in_flight{api} from the first event asked for
        until the stream ends, fails or is closed (a client that went away)."""
        start = time.perf_counter()
        outcome = "error"
        in_flight = self.metrics.in_flight.labels(api=api)
        in_flight.inc()
        span = self.tracer.start_span("ivl.gateway.chat", attributes={
            "ivl.api": api, "ivl.request_id": turn.request_id, "ivl.messages": len(turn.messages),
            **({"enduser.id": turn.user} if turn.user else {})})
        events = self._chat(turn, start, span)
        try:
            async for event in events:
                yield event
            outcome = "ok"
        except ServingError as error:
            outcome = error.code.value
            raise
        except (GeneratorExit, asyncio.CancelledError):  # the caller went away or cancelled
            outcome = "cancelled"
            raise
        finally:
            in_flight.dec()
            await events.aclose()  # at once, not at garbage collection: cancels the LLM call of a closed stream
            span.set_attribute("ivl.outcome", outcome)
            if outcome not in ("ok", "cancelled"):
                span.set_status(trace.StatusCode.ERROR, outcome)
            span.end()
            self.metrics.requests.labels(api=api, outcome=outcome).inc()
            self.metrics.request_latency.labels(api=api).observe(time.perf_counter() - start)

    async def _chat(
        self, turn: ChatTurn, start: float, span: trace.Span
    ) -> AsyncGenerator[gateway_pb2.ChatResponse, None]:
        """The downstream calls are made with the turn's span current (trace.use_span around each call's start,
        never across a yield), so their client spans and the services' server spans join its trace."""
        images = collect_images(turn, self.limits)
        with trace.use_span(span, end_on_exit=False):
            llm_info = await self.llm.info()
        self.metrics.model_name = self.settings.model_name or llm_info.model_id
        if turn.user:
            log.info("chat turn %s for user %r", turn.request_id, turn.user)
        embeddings: list[WireTensor] = []
        hits = 0
        vision_s = 0.0
        if images:
            vision_info = await self.vision.info()
            if vision_info.hidden_size != llm_info.hidden_size:
                raise ServingError(
                    ErrorCode.FAILED_PRECONDITION,
                    f"the vision service outputs width {vision_info.hidden_size} but the LLM's hidden size is "
                    f"{llm_info.hidden_size}: the two services run different models",
                )
            check_image_bytes(images, vision_info.max_image_bytes)
            defaults, limit = await self.default_tiling()
            tiling = resolve_tiling(turn.tiling, defaults, limit)
            vision_start = time.perf_counter()
            with self.tracer.start_as_current_span("ivl.gateway.embeddings", context=trace.set_span_in_context(span),
                                                   attributes={"ivl.images": len(images)}) as embeddings_span:
                resolved = await self.resolver.resolve(
                    images, tiling, len(turn.messages) - 1, vision_info.fingerprint,
                    vision_info.hidden_size, llm_info.context_length,
                )
                embeddings_span.set_attribute("ivl.cache_hits", sum(item.cache_hit for item in resolved))
            vision_s = time.perf_counter() - vision_start
            for item in resolved:
                hits += item.cache_hit
                embeddings.append(item.embedding.to_wire())
                yield gateway_pb2.ChatResponse(
                    image=gateway_pb2.ImageInfo(
                        message_index=item.image.message_index,
                        image_index=item.image.image_index,
                        plan=item.embedding.plan,
                        cache_hit=item.cache_hit,
                        encode_s=item.encode_s,
                    )
                )
        request = generate_request_bytes(
            llm_pb2.GenerateRequest(messages=llm_messages(turn, len(images)), sampling=turn.sampling,
                                    request_id=turn.request_id),
            embeddings,
        )
        first_token_at: float | None = None
        last_token_at = 0.0
        span.set_attributes({"ivl.images": len(images), "ivl.model": self.metrics.model_name})
        finished = False
        responses = self.llm.generate(request)
        with trace.use_span(span, end_on_exit=False):  # the Generate call (and its client span) starts here
            first = await anext(responses, None)
        async for response in _prepend(first, responses):
            if response.HasField("delta"):
                delta = response.delta
                now = time.perf_counter()
                if first_token_at is None:
                    first_token_at = now
                    self.metrics.ttft.observe(first_token_at - start)
                elif delta.tokens:
                    self.metrics.observe_inter_token(now - last_token_at, delta.tokens)
                last_token_at = now
                if delta.text or delta.logprobs:
                    yield gateway_pb2.ChatResponse(delta=delta.text, choice_index=delta.index, logprobs=delta.logprobs)
            elif response.HasField("final"):
                usage = common_pb2.Usage()
                usage.CopyFrom(response.final.usage)
                now = time.perf_counter()
                usage.total_s = now - start
                usage.time_to_first_token_s = (first_token_at or now) - start
                self.metrics.observe_usage(usage)
                yield gateway_pb2.ChatResponse(
                    final=gateway_pb2.Final(
                        finish_reason=response.final.finish_reason,
                        usage=usage,
                        images=len(images),
                        cache_hits=hits,
                        vision_s=vision_s,
                        choice_finish_reasons=response.final.choice_finish_reasons,
                    )
                )
                finished = True  # read on to the stream's end (right after Final): the call ends cleanly, its span too
        if not finished:
            raise ServingError(ErrorCode.UNAVAILABLE, "the LLM service ended the stream without a final message")

    async def readiness(self) -> Readiness:
        """Vision and LLM reachable (a replica answers its Info, and the balanced channel that chats take has
        a connected, SERVING replica), each service's replicas agreeing on their model, and compatible (same
        hidden size); every replica's answer and the Redis state reported."""
        vision_info, vision_detail = await _service_readiness(self.vision)
        llm_info, llm_detail = await _service_readiness(self.llm)
        if vision_info is not None:
            vision_detail.update(model_id=vision_info.model_id, fingerprint=vision_info.fingerprint)
        if llm_info is not None:
            llm_detail.update(model_id=llm_info.model_id, context_length=llm_info.context_length)
        ready = vision_info is not None and llm_info is not None
        detail: dict[str, object] = {"vision": vision_detail, "llm": llm_detail}
        if vision_info is not None and llm_info is not None and vision_info.hidden_size != llm_info.hidden_size:
            ready = False
            detail["compatible"] = f"vision width {vision_info.hidden_size} != LLM hidden size {llm_info.hidden_size}"
        else:
            detail["compatible"] = ready
        vision_detail["replicas"] = self.vision.replicas.describe()
        llm_detail["replicas"] = self.llm.replicas.describe()
        if self.cache.enabled:
            detail["redis"] = "ok" if await self.cache.ping() else "down (serving uncached)"
        else:
            detail["redis"] = "disabled"
        return Readiness(ready, detail)


READY_CONNECT_WAIT_S = 1.0  # /ready waits this long for the balanced channel (an idle one reconnects in ms)


async def _service_readiness(client: VisionClient | LLMClient) -> tuple[Any, dict[str, object]]:
    """(the service's agreed Info, or None when it is not ready; what /ready says about it)."""
    try:
        info = await client.info(refresh=True)
    except ServingError as error:
        return None, {"ok": False, "error": error.message}
    if not await client.replicas.wait_connected(READY_CONNECT_WAIT_S):
        return None, {"ok": False, "error": (
            f"a {client.name} replica answers its Info, but the channel chats take has no connected, SERVING "
            f"replica yet (grpc state {client.replicas.channel_state()}; it redials within REPLICA_BACKOFF_S)")}
    return info, {"ok": True}


async def _prepend(
    first: llm_pb2.GenerateResponse | None, rest: AsyncGenerator[llm_pb2.GenerateResponse, None]
) -> AsyncGenerator[llm_pb2.GenerateResponse, None]:
    try:
        if first is not None:
            yield first
            async for item in rest:
                yield item
    finally:
        await rest.aclose()
