"""Client of the LLM replicas (ivl.llm.v1): Info and the streaming Generate call.

Closing the stream (the caller went away or cancelled) cancels the downstream gRPC call, which is what
stops generation in the LLM service and frees its slot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
from ivl_proto import tensor_wire
from ivl_proto.errors import from_grpc_error
from ivl_proto.llm.v1 import llm_pb2, llm_pb2_grpc
from ivl_proto.tensor_wire import WireTensor

from ivl_gateway.replicas import no_replica_error
from ivl_gateway.service_client import ServiceClient
from ivl_gateway.settings import GatewaySettings

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LanguageModel"].full_name


def _serialize(request: llm_pb2.GenerateRequest | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def llm_stub(channel: grpc.aio.Channel) -> llm_pb2_grpc.LanguageModelStub:
    """The generated stub, with Generate also taking a request already serialized (generate_request_bytes)."""
    stub = llm_pb2_grpc.LanguageModelStub(channel)
    stub.Generate = channel.unary_stream(  # type: ignore[method-assign]
        f"/{SERVICE_NAME}/Generate", request_serializer=_serialize,
        response_deserializer=llm_pb2.GenerateResponse.FromString,
    )
    return stub


def generate_request_bytes(request: llm_pb2.GenerateRequest, embeddings: Sequence[WireTensor]) -> bytes:
    """`request` (without embeddings) plus `embeddings` as its image_embeddings, serialized with one copy of each
    embedding's data (from the vision response or the Redis value it is a view of)."""
    pieces: list[tensor_wire.Buffer] = [request.SerializeToString()]
    for tensor in embeddings:
        pieces += tensor_wire.submessage(IMAGE_EMBEDDINGS_FIELD, tensor.pieces())
    return tensor_wire.join(pieces)


IMAGE_EMBEDDINGS_FIELD = llm_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["image_embeddings"].number


class LLMClient(ServiceClient[llm_pb2.InfoResponse]):
    def __init__(self, settings: GatewaySettings) -> None:
        super().__init__("LLM", settings.llm_addresses, llm_stub, llm_pb2.InfoRequest(), settings)

    async def generate(self, request: llm_pb2.GenerateRequest | bytes) -> AsyncIterator[llm_pb2.GenerateResponse]:
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
