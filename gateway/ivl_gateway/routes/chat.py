"""POST /v1/chat/completions: the OpenAI request -> one chat turn (chat.ChatService) -> a completion, or a
stream of chunks (SSE). Choices (n), logprobs and tool calls are assembled here from the turn's events.

A client that goes away cancels the turn: before the first chunk by racing the work against the ASGI
`http.disconnect` (disconnect.unless_disconnected), during a stream through Starlette's own disconnect watch,
which closes the event generator and so the downstream Generate call.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf.json_format import MessageToDict
from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.gateway.v1 import gateway_pb2

from ivl_gateway.conversation import ChatTurn
from ivl_gateway.disconnect import ClientGone, unless_disconnected
from ivl_gateway.http_context import HttpContext, decode_json
from ivl_gateway.http_edge import request_id, take_body
from ivl_gateway.openai_request import ChatCompletionRequest, ignored_fields, parse_request
from ivl_gateway.openai_response import (
    FINISH_REASONS,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    ErrorResponse,
    FunctionCallOut,
    ToolCallDelta,
    ToolCallOut,
    error_body,
    logprobs_of,
    usage_of,
)
from ivl_gateway.openai_turn import turn_from_request
from ivl_gateway.tool_calls import StreamingCallParser, parse_calls

router = APIRouter(tags=["chat"])
IGNORED_HEADER = "x-ivl-ignored-fields"


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
                        415: {"model": ErrorResponse}, 429: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def chat_completions(request: Request) -> Response:
    context = HttpContext.of(request)
    body = parse_request(decode_json(take_body(request.scope)), context.settings.ignore_unsupported_fields)
    name = await context.model_for(body.model)
    turn = await turn_from_request(body, context.fetcher, context.settings, f"chatcmpl-{request_id(request.scope)}")
    turn.user = body.user or ""
    ignored = ignored_fields(body)
    headers = {IGNORED_HEADER: ",".join(ignored)} if ignored else {}
    if body.stream:
        return await _stream(request, context, turn, name, body, headers)
    return await _complete(request, context, turn, name, body, headers)


@dataclass
class _ChoiceText:
    texts: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)


def _image_info(event: gateway_pb2.ImageInfo) -> dict[str, Any]:
    return MessageToDict(event, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _extra(final: gateway_pb2.Final, images: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "images": images,
        "cache_hits": final.cache_hits,
        "vision_s": final.vision_s,
        "time_to_first_token_s": final.usage.time_to_first_token_s,
        "decode_tokens_per_s": final.usage.decode_tokens_per_s,
        "total_s": final.usage.total_s,
    }


def _reason(final: gateway_pb2.Final, index: int) -> str:
    reasons = final.choice_finish_reasons
    return FINISH_REASONS[reasons[index] if index < len(reasons) else final.finish_reason]


def _client_gone() -> JSONResponse:
    return JSONResponse(error_body(ServingError(ErrorCode.CANCELLED, "client went away")), 499)


async def _complete(request: Request, context: HttpContext, turn: ChatTurn, name: str, body: ChatCompletionRequest,
                    headers: dict[str, str]) -> Response:
    async def collect() -> tuple[dict[int, _ChoiceText], gateway_pb2.Final, list[dict[str, Any]]]:
        choices: dict[int, _ChoiceText] = {i: _ChoiceText() for i in range(body.n)}
        images: list[dict[str, Any]] = []
        final = gateway_pb2.Final()
        stream = context.chat.chat(turn, api="http")
        try:
            async for event in stream:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    choice = choices.setdefault(event.choice_index, _ChoiceText())
                    choice.texts.append(event.delta)
                    choice.logprobs.extend(event.logprobs)
                elif kind == "image":
                    images.append(_image_info(event.image))
                elif kind == "final":
                    final = event.final
        finally:
            await stream.aclose()
        return choices, final, images

    try:
        choices, final, images = await unless_disconnected(request.receive, collect())
    except ClientGone:
        return _client_gone()
    tools = body.tool_choice_mode != "none"
    out: list[Choice] = []
    for index in sorted(choices):
        text = "".join(choices[index].texts)
        content, calls = parse_calls(text) if tools else (text, [])
        message = AssistantMessage(content=content, tool_calls=[
            ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls] or None)
        logprobs = ChoiceLogprobs(content=logprobs_of(choices[index].logprobs)) if body.logprobs else None
        out.append(Choice(index=index, message=message, finish_reason="tool_calls" if calls else _reason(final, index),
                          logprobs=logprobs))
    completion = ChatCompletion(id=turn.request_id, model=name, choices=out, usage=usage_of(final.usage),
                                ivl=_extra(final, images))
    return JSONResponse(completion.model_dump(), headers=headers)


async def _stream(request: Request, context: HttpContext, turn: ChatTurn, name: str, body: ChatCompletionRequest,
                  headers: dict[str, str]) -> Response:
    stream = context.chat.chat(turn, api="http")
    buffered: list[gateway_pb2.ChatResponse] = []

    async def first_events() -> None:  # up to the first text (or the end): early errors get a real status
        async for event in stream:
            buffered.append(event)
            if event.WhichOneof("event") != "image":
                break

    try:  # a client that hangs up before the first token frees its LLM queue slot at once
        await unless_disconnected(request.receive, first_events())
    except ClientGone:
        await stream.aclose()
        return _client_gone()
    except BaseException:
        await stream.aclose()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    tools = body.tool_choice_mode != "none"
    cid = turn.request_id

    def chunk(index: int, delta: ChunkDelta, finish: str | None = None, logprobs: list[Any] | None = None,
              extra: dict[str, Any] | None = None) -> str:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish,
                             logprobs=ChoiceLogprobs(content=logprobs_of(logprobs)) if logprobs is not None else None)
        return _sse(ChatCompletionChunk(id=cid, model=name, choices=[choice], ivl=extra).body())

    async def events() -> AsyncIterator[str]:
        images: list[dict[str, Any]] = []
        parsers = {i: StreamingCallParser() for i in range(body.n)}
        try:
            for index in range(body.n):
                yield chunk(index, ChunkDelta(role="assistant", content=""))
            async for event in _chain(buffered, stream):
                kind = event.WhichOneof("event")
                if kind == "image":
                    images.append(_image_info(event.image))
                elif kind == "delta":
                    index = event.choice_index
                    logprobs = list(event.logprobs) if body.logprobs else None
                    if not tools:
                        yield chunk(index, ChunkDelta(content=event.delta), logprobs=logprobs)
                        continue
                    parser = parsers.setdefault(index, StreamingCallParser())
                    before = parser.calls
                    text, calls = parser.feed(event.delta)
                    if text or logprobs:
                        yield chunk(index, ChunkDelta(content=text), logprobs=logprobs)
                    for offset, call in enumerate(calls):
                        yield chunk(index, ChunkDelta(tool_calls=[ToolCallDelta(
                            index=before + offset, id=call.id,
                            function=FunctionCallOut(name=call.name, arguments=call.arguments))]))
                elif kind == "final":
                    final = event.final
                    for index in sorted(parsers):
                        held = parsers[index].flush()
                        if held:
                            yield chunk(index, ChunkDelta(content=held))
                        reason = "tool_calls" if parsers[index].calls else _reason(final, index)
                        last = index == max(parsers)
                        yield chunk(index, ChunkDelta(), reason, extra=_extra(final, images) if last else None)
                    if include_usage:
                        usage = ChatCompletionChunk(id=cid, model=name, choices=[], usage=usage_of(final.usage))
                        yield _sse(usage.body())
        except ServingError as error:
            yield _sse(error_body(error))
        finally:
            await stream.aclose()
        yield "data: [DONE]\n\n"

    return _ClosingStreamingResponse(events(), stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes the chat stream, also when the client goes away before the
    body is iterated (then the events generator never starts, and its own `finally` would not run)."""

    def __init__(self, content: AsyncIterator[str], chat_stream: AsyncGenerator[Any, None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._events = content
        self._chat_stream = chat_stream

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if isinstance(self._events, AsyncGenerator):
                await self._events.aclose()
            await self._chat_stream.aclose()


async def _chain(
    first: list[gateway_pb2.ChatResponse], rest: AsyncIterator[gateway_pb2.ChatResponse]
) -> AsyncIterator[gateway_pb2.ChatResponse]:
    for event in first:
        yield event
    async for event in rest:
        yield event


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
