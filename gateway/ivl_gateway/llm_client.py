"""Client of the LLM replicas (ivl.llm.v1): Info and the streaming Generate call.

Closing the stream (the caller went away or cancelled) cancels the downstream gRPC call, which is what
stops generation in the LLM service and frees its slot. A replica that fails UNAVAILABLE before its first
message is retried on the next one by grpc's retry policy (replicas.py); after that, the error is the caller's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
from ivl_proto.llm.v1 import llm_pb2, llm_pb2_grpc

from ivl_gateway.service_client import ServiceClient
from ivl_gateway.settings import GatewaySettings

GRPC_SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LanguageModel"].full_name


def llm_identity(info: llm_pb2.InfoResponse) -> tuple[tuple[str, object], ...]:
    """What must be equal on every LLM replica: the model and what the gateway plans prompts with."""
    return (("model_id", info.model_id), ("template", info.template), ("hidden_size", info.hidden_size),
            ("context_length", info.context_length))


class LLMClient(ServiceClient[llm_pb2.InfoResponse]):
    def __init__(self, settings: GatewaySettings, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> None:
        super().__init__("LLM", settings.llm_addresses, llm_pb2_grpc.LanguageModelStub, GRPC_SERVICE,
                         llm_pb2.InfoRequest(), llm_identity, settings, settings.llm_timeout_s, interceptors)

    def generate(self, request: llm_pb2.GenerateRequest) -> AsyncIterator[llm_pb2.GenerateResponse]:
        return self.stream("Generate", request, self._settings.llm_timeout_s)
