"""Shared gRPC plumbing: channel/server options, error mapping, health, reflection, binding, stop signals
(the server lifecycle itself is ivl_proto.server_lifecycle)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ivl_proto.errors import ERROR_CODE_METADATA_KEY, ErrorCode, ServingError

log = logging.getLogger(__name__)

# 40 tiles x 256 tokens x 6144 hidden x 4 bytes (fp32) = 252 MB for one image of InternVL-Chat-V1-5.
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024

T = TypeVar("T")


def message_size_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options raising gRPC's 4 MiB default on both send and receive, for servers and channels."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


OUT_OF_MEMORY = ServingError(
    ErrorCode.RESOURCE_EXHAUSTED,
    "the service ran out of memory for this request; retry later, or send fewer or smaller images",
)


def map_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an async servicer method (unary or server-streaming) so that a ServingError aborts
    the call with the status from the error table and its message, also mid-stream. A MemoryError
    (an allocation the process could not make) is RESOURCE_EXHAUSTED, never an internal error."""

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except ServingError as error:
                await context.abort(error.grpc_status, error.message, _code_metadata(error))
            except MemoryError:
                log.warning("out of memory in %s", method.__name__)
                await context.abort(OUT_OF_MEMORY.grpc_status, OUT_OF_MEMORY.message, _code_metadata(OUT_OF_MEMORY))

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except ServingError as error:
            await context.abort(error.grpc_status, error.message, _code_metadata(error))
        except MemoryError:
            log.warning("out of memory in %s", method.__name__)
            await context.abort(OUT_OF_MEMORY.grpc_status, OUT_OF_MEMORY.message, _code_metadata(OUT_OF_MEMORY))

    return unary_wrapper


def _code_metadata(error: ServingError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata naming the ErrorCode (see errors.ERROR_CODE_METADATA_KEY)."""
    return ((ERROR_CODE_METADATA_KEY, error.code.value),)


async def abort_with(
    context: grpc.aio.ServicerContext, error: ServingError, extra_trailers: Iterable[tuple[str, str]] = ()
) -> None:
    """Abort the call with the error's mapped status and message (and its ErrorCode in trailing metadata)."""
    await context.abort(error.grpc_status, error.message, (*_code_metadata(error), *extra_trailers))


def new_aio_server(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    *,
    max_receive_bytes: int | None = None,
    options: Iterable[tuple[str, Any]] = (),
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    maximum_concurrent_rpcs: int | None = None,
) -> grpc.aio.Server:
    """A grpc.aio server; `max_receive_bytes` (default max_message_bytes) is grpc's own limit on one
    received message: larger ones are refused with RESOURCE_EXHAUSTED before anything parses them."""
    size_options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_receive_bytes or max_message_bytes),
    ]
    return grpc.aio.server(options=[*size_options, *options], interceptors=list(interceptors) or None,
                           maximum_concurrent_rpcs=maximum_concurrent_rpcs)


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Iterable[str], *, reflection_enabled: bool = True
) -> health.aio.HealthServicer:
    """Register grpc.health.v1 (every service NOT_SERVING until set_serving) and, unless disabled, reflection."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    if reflection_enabled:
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
    return health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


def register_service(server: grpc.aio.Server, service_name: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
    """Register hand-written method handlers of one service the way the generated add_*_to_server does (a
    servicer that reads or writes its messages itself, e.g. views of received bytes or pre-serialized replies)."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
    server.add_registered_method_handlers(service_name, handlers)


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    """Bind an insecure port (0 = pick a free one) and return the bound port."""
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    return bound


async def wait_for_stop_signal() -> None:
    """Block until SIGINT or SIGTERM arrives."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

