"""Client of the LLM replicas (ivl.llm.v1): Info and the streaming Generate call.

Closing the stream (the caller went away or cancelled) cancels the downstream gRPC call, which is what
stops generation in the LLM service and frees its slot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
from ivl_proto.errors import from_grpc_error
from ivl_proto.llm.v1 import llm_pb2, llm_pb2_grpc

from ivl_gateway.replicas import no_replica_error
from ivl_gateway.service_client import ServiceClient
from ivl_gateway.settings import GatewaySettings


class LLMClient(ServiceClient[llm_pb2.InfoResponse]):
    def __init__(self, settings: GatewaySettings, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> None:
        super().__init__("LLM", settings.llm_addresses, llm_pb2_grpc.LanguageModelStub, llm_pb2.InfoRequest(), settings,
                         interceptors)

    async def generate(self, request: llm_pb2.GenerateRequest) -> AsyncIterator[llm_pb2.GenerateResponse]:
        """Stream from the next usable replica; moves on only if a replica fails before answering."""
        tried: list[str] = []
        for replica in self.pool.ordered():
            call = replica.stub.Generate(request, timeout=self._settings.llm_timeout_s)
            answered = False
            try:
                async for response in call:
                    answered = True
                    yield response
                self.pool.mark_up(replica)
                return
            except grpc.aio.AioRpcError as error:
                if error.code() is grpc.StatusCode.UNAVAILABLE and not answered:
                    self.pool.mark_down(replica, error.details() or "unavailable")
                    tried.append(f"{replica.address}: {error.details()}")
                    continue
                raise from_grpc_error(error, "LLM") from error
            finally:
                call.cancel()
        raise no_replica_error(self.pool, tried)
