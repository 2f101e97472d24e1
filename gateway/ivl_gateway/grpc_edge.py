"""The public gRPC port's admission, as one grpc.aio server interceptor (no per-method code).

Before this runs, grpc itself refuses a message over `max_request_bytes` (the server's
max_receive_message_length): RESOURCE_EXHAUSTED, nothing parsed. Then, per call:
1. grpc.health.v1: always open. Server reflection: open, API key only, or not registered at all
   (`reflection_access`).
2. API key from the metadata alone (`authorization: Bearer KEY` or `x-api-key`): a call without a valid
   key gets UNAUTHENTICATED from a handler that never deserializes the request; the servicer never runs.
3. For the methods of ivl.gateway.v1.Chat the request arrives as raw bytes (deserialization is deferred):
   the per-client rate limit (RESOURCE_EXHAUSTED with a `retry-after` trailer; client = API key or peer
   IP), then the request-bytes budget (RESOURCE_EXHAUSTED, code `overloaded`), and only then parsing
   and the servicer. The budget is given back when the call ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.grpc_runtime import abort_with
from ivl_proto.internal_auth import rejecting_handler

from ivl_gateway.auth import ApiKeys
from ivl_gateway.edge_state import EdgeState
from ivl_gateway.rate_limit import RateLimited, client_identity

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."


def peer_ip(peer: str) -> str:
    """'ipv4:127.0.0.1:5000' -> '127.0.0.1'; 'ipv6:[::1]:5000' -> '::1'; anything else as it is."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, edges: EdgeState, chat_service_name: str) -> None:
        self._edges = edges
        self._chat_prefix = f"/{chat_service_name}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        edges = self._edges
        needs_key = edges.keys.enabled
        if method.startswith(REFLECTION_PREFIX):
            if edges.settings.reflection_access == "open":
                return handler
            needs_key = True
        key = ApiKeys.from_metadata(handler_call_details.invocation_metadata)
        valid = edges.keys.is_valid(key)
        if needs_key and not valid:
            error = _key_error(key, edges.keys.enabled)
            edges.refused("grpc", error)
            return rejecting_handler(handler, error.grpc_status, error.message,
                                     (("ivl-error-code", error.code.value),))
        if method.startswith(self._chat_prefix) and not handler.request_streaming:
            return self._admitting(handler, client_identity(key, valid, None) if valid else None)
        return handler

    def _admitting(self, handler: grpc.RpcMethodHandler, identity: str | None) -> grpc.RpcMethodHandler:
        """The handler with deferred parsing: rate limit and budget first, on the raw request bytes."""
        parse = handler.request_deserializer
        edges = self._edges

        async def admit(raw: bytes, context: grpc.aio.ServicerContext) -> int:
            try:
                if edges.rate_limit.enabled:
                    edges.rate_limit.check(identity or client_identity(None, False, peer_ip(context.peer())))
                if edges.budget.counts(len(raw)):
                    edges.budget.take(len(raw))
                else:
                    return 0
            except RateLimited as error:
                edges.refused("grpc", error)
                await abort_with(context, error, (("retry-after", str(error.retry_after_s)),))
            except ServingError as error:
                edges.refused("grpc", error)
                await abort_with(context, error)
            return len(raw)

        def done(size: int) -> None:
            edges.budget.give_back(size)

        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def stream_behavior(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                size = await admit(raw, context)
                try:
                    request = parse(raw) if parse else raw
                    del raw
                    async for item in inner_stream(request, context):
                        yield item
                finally:
                    done(size)

            return grpc.unary_stream_rpc_method_handler(
                stream_behavior, request_deserializer=None, response_serializer=handler.response_serializer)

        inner_unary = handler.unary_unary

        async def unary_behavior(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            size = await admit(raw, context)
            try:
                request = parse(raw) if parse else raw
                del raw
                return await inner_unary(request, context)
            finally:
                done(size)

        return grpc.unary_unary_rpc_method_handler(
            unary_behavior, request_deserializer=None, response_serializer=handler.response_serializer)


def _key_error(key: str | None, keys_configured: bool) -> ServingError:
    if not keys_configured:
        return ServingError(ErrorCode.UNAUTHENTICATED, "this method needs an API key and none is configured")
    if not key:
        return ServingError(
            ErrorCode.UNAUTHENTICATED,
            "this gateway needs an API key: send 'authorization: Bearer <key>' (or 'x-api-key') metadata",
        )
    return ServingError(ErrorCode.UNAUTHENTICATED, "the API key is not valid")
