"""Client of the LLM replicas (ivl.llm.v1): Info and the streaming Generate call.

Closing the stream (the caller went away or cancelled) cancels the downstream gRPC call, which is what
stops generation in the LLM service and frees its slot. A replica that fails UNAVAILABLE before its first
message is retried on the next one by grpc's retry policy (replicas.py); after that, the error is the caller's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
from ivl_proto import tensor_wire
from ivl_proto.llm.v1 import llm_pb2, llm_pb2_grpc
from ivl_proto.tensor_wire import WireTensor

from ivl_gateway.service_client import ServiceClient
from ivl_gateway.settings import GatewaySettings

GRPC_SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LanguageModel"].full_name
IMAGE_EMBEDDINGS_FIELD = llm_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["image_embeddings"].number


def _serialize(request: llm_pb2.GenerateRequest | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def llm_stub(channel: grpc.aio.Channel) -> llm_pb2_grpc.LanguageModelStub:
    """The generated stub, with Generate also taking a request already serialized (generate_request_bytes)."""
    stub = llm_pb2_grpc.LanguageModelStub(channel)
    stub.Generate = channel.unary_stream(  # type: ignore[method-assign]
        f"/{GRPC_SERVICE}/Generate", request_serializer=_serialize,
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


def llm_identity(info: llm_pb2.InfoResponse) -> tuple[tuple[str, object], ...]:
    """What must be equal on every LLM replica: the model and what the gateway plans prompts with."""
    return (("model_id", info.model_id), ("template", info.template), ("hidden_size", info.hidden_size),
            ("context_length", info.context_length))


class LLMClient(ServiceClient[llm_pb2.InfoResponse]):
    def __init__(self, settings: GatewaySettings, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> None:
        super().__init__("LLM", settings.llm_addresses, llm_stub, GRPC_SERVICE,
                         llm_pb2.InfoRequest(), llm_identity, settings, settings.llm_timeout_s, interceptors)

    def generate(self, request: llm_pb2.GenerateRequest | bytes) -> AsyncIterator[llm_pb2.GenerateResponse]:
        """`request` may be already serialized (generate_request_bytes: one copy of each embedding)."""
        return self.stream("Generate", request, self._settings.llm_timeout_s)
