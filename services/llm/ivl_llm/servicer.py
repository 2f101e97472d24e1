"""gRPC ivl.llm.v1.LanguageModel: proto <-> domain only; errors go through map_errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError
from ivl_proto import tensor_wire
from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import invalid
from ivl_proto.grpc_runtime import map_errors, register_service
from ivl_proto.llm.v1 import llm_pb2, llm_pb2_grpc
from ivl_proto.tensor_codec import tensor_from_pb

from ivl_llm.prompt import ImageEmbedding
from ivl_llm.sampling import Guided, Sampling
from ivl_llm.service import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Finished, LLMService, TokenLogprob
from ivl_llm.templates import ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_USER, ChatMessage

ROLES = {
    common_pb2.ROLE_SYSTEM: ROLE_SYSTEM,
    common_pb2.ROLE_USER: ROLE_USER,
    common_pb2.ROLE_ASSISTANT: ROLE_ASSISTANT,
}
SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LanguageModel"].full_name
FINISH_REASONS = {
    FINISH_STOP: common_pb2.FINISH_REASON_STOP,
    FINISH_LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FINISH_CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
}


def messages_from_pb(request: llm_pb2.GenerateRequest) -> list[ChatMessage]:
    out = []
    for index, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise invalid(f"message {index} has no role; set ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT")
        out.append(ChatMessage(ROLES[message.role], message.content))
    return out


def sampling_from_pb(params: common_pb2.SamplingParams) -> Sampling:
    def get(name: str, default: object) -> object:
        return getattr(params, name) if params.HasField(name) else default

    return Sampling(
        max_new_tokens=get("max_new_tokens", None),  # type: ignore[arg-type]
        temperature=float(get("temperature", 0.0)),  # type: ignore[arg-type]
        top_p=float(get("top_p", 1.0)),  # type: ignore[arg-type]
        top_k=int(get("top_k", 0)),  # type: ignore[call-overload]
        repetition_penalty=float(get("repetition_penalty", 1.0)),  # type: ignore[arg-type]
        seed=get("seed", None),  # type: ignore[arg-type]
        stop=tuple(params.stop),
        presence_penalty=float(get("presence_penalty", 0.0)),  # type: ignore[arg-type]
        frequency_penalty=float(get("frequency_penalty", 0.0)),  # type: ignore[arg-type]
        logit_bias=tuple(sorted((int(k), float(v)) for k, v in params.logit_bias.items())),
        min_new_tokens=int(get("min_new_tokens", 0)),  # type: ignore[call-overload]
        stop_token_ids=tuple(int(i) for i in params.stop_token_ids),
        logprobs=params.logprobs,
        top_logprobs=int(get("top_logprobs", 0)),  # type: ignore[call-overload]
        n=int(get("n", 1)),  # type: ignore[call-overload]
        guided=guided_from_pb(params.guided) if params.HasField("guided") else None,
    )


def guided_from_pb(guided: common_pb2.GuidedDecoding) -> Guided | None:
    kind = guided.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_object":
        return Guided("json_object") if guided.json_object else None
    if kind == "json_schema":
        return Guided("json_schema", json_schema=guided.json_schema)
    calls = guided.tool_calls
    return Guided("tool_calls", call_schemas=tuple(calls.call_schemas), required=calls.required, parallel=calls.parallel)


def logprob_to_pb(entry: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=entry.token_id, token=entry.token, logprob=entry.logprob, token_bytes=entry.token_bytes,
        top=[logprob_to_pb(t) for t in entry.top],
    )


@dataclass(frozen=True)
class GenerateCall:
    """A received GenerateRequest whose embeddings' data was left in the received bytes (tensor_wire.split_tensors):
    `request.image_embeddings[i].data` is empty and `embedding_data[i]` views those bytes, no copy."""

    request: llm_pb2.GenerateRequest
    embedding_data: list[memoryview]


def parse_generate(raw: bytes) -> GenerateCall | Undecodable:
    try:
        request, datas = tensor_wire.split_tensors(llm_pb2.GenerateRequest, raw, (2,))
    except (ValueError, DecodeError) as error:
        return Undecodable(str(error))
    return GenerateCall(request, datas)


@dataclass(frozen=True)
class Undecodable:
    reason: str


def embeddings_from_pb(request: llm_pb2.GenerateRequest, data: list[memoryview] | None = None) -> list[ImageEmbedding]:
    return [
        ImageEmbedding(tensor_from_pb(t, f"image embedding {i}", None if data is None else data[i]), t.dtype)
        for i, t in enumerate(request.image_embeddings)
    ]


def add_llm_servicer(servicer: LanguageModelServicer, server: grpc.aio.Server) -> None:
    """Register ivl.llm.v1.LanguageModel like the generated add_LanguageModelServicer_to_server, except that
    Generate's embeddings are read as views of the received bytes (one conversion, into the prompt's embeddings)."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=parse_generate,
            response_serializer=llm_pb2.GenerateResponse.SerializeToString,
        ),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, request_deserializer=llm_pb2.InfoRequest.FromString,
            response_serializer=llm_pb2.InfoResponse.SerializeToString,
        ),
    }
    register_service(server, SERVICE_NAME, handlers)


class LanguageModelServicer(llm_pb2_grpc.LanguageModelServicer):
    def __init__(self, service: LLMService) -> None:
        self.service = service

    @map_errors
    async def Generate(
        self, request: llm_pb2.GenerateRequest | GenerateCall | Undecodable, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        if isinstance(request, Undecodable):
            raise invalid(f"the request is not a valid ivl.llm.v1.GenerateRequest ({request.reason})")
        data = request.embedding_data if isinstance(request, GenerateCall) else None
        message = request.request if isinstance(request, GenerateCall) else request
        events = self.service.generate(messages_from_pb(message), embeddings_from_pb(message, data),
                                       sampling_from_pb(message.sampling))
        try:
            async for event in events:
                if isinstance(event, Finished):
                    usage = common_pb2.Usage(**vars(event.usage))
                    final = llm_pb2.Final(finish_reason=FINISH_REASONS[event.reason], usage=usage,
                                          choice_finish_reasons=[FINISH_REASONS[r] for r in event.choice_reasons])
                    yield llm_pb2.GenerateResponse(final=final)
                else:
                    yield llm_pb2.GenerateResponse(delta=llm_pb2.Delta(
                        text=event.text, tokens=event.tokens, token_ids=event.token_ids, index=event.index,
                        logprobs=[logprob_to_pb(e) for e in event.logprobs]))
        finally:
            await events.aclose()  # a cancelled call stops the generation here, at once

    @map_errors
    async def Info(
        self, request: llm_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> llm_pb2.InfoResponse:
        return llm_pb2.InfoResponse(**self.service.info())
