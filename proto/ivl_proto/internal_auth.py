"""A shared token between the gateway and the internal services (vision, LLM), checked by a server
interceptor before any handler runs and before the request message is deserialized.

    server: new_aio_server(..., interceptors=token_server_interceptors(settings.auth_token))
    client: grpc.aio.insecure_channel(address, interceptors=token_client_interceptors(token))

The token travels as `x-ivl-internal-token` metadata and is compared in constant time. grpc.health.v1
stays open (probes and the launcher need no secret). An empty token turns the check off. The token
authenticates the caller; it does not encrypt: across an untrusted network use TLS (docs/gateway.md
"Internal ports").
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

TOKEN_METADATA_KEY = "x-ivl-internal-token"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)

_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _ignore_request(_: bytes) -> None:
    return None


def rejecting_handler(
    handler: grpc.RpcMethodHandler, status: grpc.StatusCode, message: str,
    trailers: Sequence[tuple[str, str]] = (),
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts at once and never parses the request bytes."""

    async def abort(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(status, message, tuple(trailers))

    factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(abort, request_deserializer=_ignore_request, response_serializer=handler.response_serializer)


def metadata_value(metadata: Sequence[Any] | None, key: str) -> str | None:
    for item in metadata or ():
        if item[0].lower() == key and isinstance(item[1], str):
            return item[1]
    return None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for every method but the open ones unless the metadata carries the token."""

    def __init__(self, token: str, service: str, open_prefixes: Sequence[str] = OPEN_PREFIXES) -> None:
        self._token = token.encode()
        self._service = service
        self._open = tuple(open_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._open):
            return handler
        presented = metadata_value(handler_call_details.invocation_metadata, TOKEN_METADATA_KEY)
        if presented is not None and hmac.compare_digest(presented.encode(), self._token):
            return handler
        why = "carries no internal token" if presented is None else "carries a wrong internal token"
        return rejecting_handler(
            handler, grpc.StatusCode.UNAUTHENTICATED,
            f"the {self._service} service takes calls only from the gateway: the call {why} "
            f"('{TOKEN_METADATA_KEY}' metadata; set the same token on both sides)",
        )


def token_server_interceptors(token: str, service: str) -> list[grpc.aio.ServerInterceptor]:
    return [TokenAuthInterceptor(token, service)] if token else []


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), (TOKEN_METADATA_KEY, token))
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


# grpc.aio files a channel's interceptor under ONE call kind (the first isinstance match), so each kind
# needs an object of its own.
class _UnaryUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_token(client_call_details, self._token), request)


class _UnaryStreamToken(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_token(client_call_details, self._token), request)


def token_client_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that add the token to every unary and server-streaming call (none if empty)."""
    return [_UnaryUnaryToken(token), _UnaryStreamToken(token)] if token else []
