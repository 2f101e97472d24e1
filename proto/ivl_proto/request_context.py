"""The request id of the call being served, on every log line of every service.

The gateway makes (or takes the client's X-Request-Id) one id per request and sends it downstream as
`x-request-id` gRPC metadata (RequestIdClient* interceptors); the vision and LLM services read it
(RequestIdServerInterceptor) into a contextvar for the duration of the call, and `RequestIdFilter` writes it
on each log record as `%(request_id)s` ("-" outside a request). Threads started for a call (the LLM's decode
loop) run in a copy of its context, so their lines carry it too.

    install_request_id_logging(level=logging.INFO)     # python -m <service>: the format and the filter
    with bound_request_id("chatcmpl-123"): ...          # the gateway, around one request
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

REQUEST_ID_METADATA_KEY = "x-request-id"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("ivl_request_id", default="")


def current_request_id() -> str:
    return REQUEST_ID.get()


@contextlib.contextmanager
def bound_request_id(request_id: str) -> Iterator[None]:
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = REQUEST_ID.get() or "-"
        return True


def install_request_id_logging(level: int = logging.INFO, fmt: str = LOG_FORMAT) -> None:
    """basicConfig with the request-id format; the filter on every root handler (so all loggers get it)."""
    logging.basicConfig(level=level, format=fmt)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


def _from_metadata(metadata: Any) -> str:
    for item in metadata or ():
        if item[0].lower() == REQUEST_ID_METADATA_KEY and isinstance(item[1], str):
            return item[1][:128]
    return ""


class RequestIdServerInterceptor(grpc.aio.ServerInterceptor):
    """Binds the caller's x-request-id for the whole call (unary and server-streaming handlers)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        request_id = _from_metadata(handler_call_details.invocation_metadata)
        if handler is None or not request_id or handler.request_streaming:
            return handler
        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                with bound_request_id(request_id):
                    async for item in inner_stream(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
        inner_unary = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with bound_request_id(request_id):
                return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)


def _with_request_id(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    request_id = REQUEST_ID.get()
    if not request_id:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()), (REQUEST_ID_METADATA_KEY, request_id))
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


class _UnaryUnaryRequestId(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_request_id(client_call_details), request)


class _UnaryStreamRequestId(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_request_id(client_call_details), request)


def request_id_client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Send the bound request id (if any) as x-request-id on every unary and server-streaming call."""
    return [_UnaryUnaryRequestId(), _UnaryStreamRequestId()]
