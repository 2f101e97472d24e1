"""The HTTP API: OpenAI-compatible /v1/chat/completions and /v1/models, /health, /ready, /metrics.

`build_app(settings, chat_service)` returns a FastAPI app with no globals. Errors are OpenAI-shaped
bodies {"error": {"message", "type", "code"}} with the HTTP status of ivl_proto.errors' table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from google.protobuf.json_format import MessageToDict
from ivl_proto.errors import ErrorCode, ServingError, invalid
from ivl_proto.gateway.v1 import gateway_pb2

from ivl_gateway.chat import ChatService
from ivl_gateway.conversation import ChatMessage, ChatTurn
from ivl_gateway.edge_state import EdgeState
from ivl_gateway.http_edge import install_edges, request_id, take_body
from ivl_gateway.image_fetch import ImageFetcher
from ivl_gateway.openai_schema import (
    FINISH_REASONS,
    ROLES,
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    error_body,
    new_completion_id,
    parse_request,
    usage_body,
)
from ivl_gateway.settings import GatewaySettings

_DISCONNECT_POLL_S = 0.2


def _error_response(error: ServingError) -> JSONResponse:
    return JSONResponse(error_body(error), status_code=error.http_status)


def decode_json(raw: bytes | bytearray) -> Any:
    """The body as JSON (UTF-8/16/32), or a 400: malformed, nested too deeply, NaN/Infinity."""
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise invalid(
            "the request body is nested too deeply to parse: JSON arrays and objects may nest at most about "
            f"{sys.getrecursionlimit() // 2} levels"
        ) from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise invalid(f"the request body is not valid JSON: {error}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; send a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range of a 64-bit float")
    return value


async def _turn_from_openai(
    body: ChatCompletionRequest, fetcher: ImageFetcher, completion_id: str = ""
) -> ChatTurn:
    messages: list[ChatMessage] = []
    for index, message in enumerate(body.messages):
        parts: list[str | bytes] = []
        content = message.content
        if isinstance(content, str):
            parts.append(content)
        elif content is not None:
            for part in content:
                if part.type == "text":
                    parts.append(part.text or "")
                elif part.image_url is None:
                    raise invalid(f"messages[{index}]: an image_url part needs an 'image_url': {{'url': ...}}")
                else:
                    parts.append(await fetcher.load(part.image_url.url))
        messages.append(ChatMessage(role=ROLES[message.role], parts=parts))
    return ChatTurn(messages=messages, sampling=body.sampling(), tiling=body.tiling(), request_id=completion_id or new_completion_id())


def _image_info(event: gateway_pb2.ImageInfo) -> dict[str, Any]:
    return MessageToDict(event, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _final_extra(final: gateway_pb2.Final, images: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "images": images,
        "cache_hits": final.cache_hits,
        "vision_s": final.vision_s,
        "time_to_first_token_s": final.usage.time_to_first_token_s,
        "decode_tokens_per_s": final.usage.decode_tokens_per_s,
        "total_s": final.usage.total_s,
    }


def build_app(settings: GatewaySettings, chat_service: ChatService, edges: EdgeState | None = None) -> FastAPI:
    """The FastAPI app with its edges (http_edge: access log, content type, rate limit, API keys, body
    budget); `edges` is shared with the gRPC server (one budget and one rate limit per gateway)."""
    docs_on = settings.docs_access != "off"
    app = FastAPI(title="InternVL gateway", version="0.1.0", docs_url="/docs" if docs_on else None,
                  openapi_url="/openapi.json" if docs_on else None, redoc_url=None)
    edges = edges or EdgeState.build(settings, chat_service.metrics)
    install_edges(app, edges)
    fetcher = ImageFetcher(settings)
    metrics = chat_service.metrics

    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, error: ServingError) -> JSONResponse:
        return _error_response(error)

    async def model_name() -> str:
        if settings.model_name:
            return settings.model_name
        return (await chat_service.llm.info()).model_id

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        state = await chat_service.readiness()
        return JSONResponse({"ready": state.ready, **state.detail}, status_code=200 if state.ready else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:  # API key and rate limit: http_edge.EdgeMiddleware
        name = await model_name()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "ivl"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_request(decode_json(take_body(request.scope)))  # body read, limited, budgeted by http_edge
        turn = await _turn_from_openai(body, fetcher, f"chatcmpl-{request_id(request.scope)}")
        name = body.model or await model_name()
        if body.stream:
            return await _stream(request, turn, name, body)
        return await _complete(request, turn, name)

    async def _complete(request: Request, turn: ChatTurn, name: str) -> JSONResponse:
        async def collect() -> tuple[str, gateway_pb2.Final, list[dict[str, Any]]]:
            texts: list[str] = []
            images: list[dict[str, Any]] = []
            final = gateway_pb2.Final()
            stream = chat_service.chat(turn, api="http")
            try:
                async for event in stream:
                    kind = event.WhichOneof("event")
                    if kind == "delta":
                        texts.append(event.delta)
                    elif kind == "image":
                        images.append(_image_info(event.image))
                    elif kind == "final":
                        final = event.final
            finally:
                await stream.aclose()
            return "".join(texts), final, images

        task = asyncio.create_task(collect())
        if await _cancelled_when_gone(request, task):
            return _client_gone()
        text, final, images = task.result()
        return JSONResponse(
            completion_body(turn.request_id, name, text, FINISH_REASONS[final.finish_reason], final.usage,
                            _final_extra(final, images))
        )

    async def _stream(request: Request, turn: ChatTurn, name: str, body: ChatCompletionRequest) -> Response:
        stream = chat_service.chat(turn, api="http")
        buffered: list[gateway_pb2.ChatResponse] = []

        async def first_events() -> None:  # up to the first text (or the end): early errors get a real status
            async for event in stream:
                buffered.append(event)
                if event.WhichOneof("event") != "image":
                    break

        try:  # a client that hangs up before the first token frees its LLM queue slot at once
            gone = await _cancelled_when_gone(request, asyncio.create_task(first_events()))
        except BaseException:
            await stream.aclose()
            raise
        if gone:
            await stream.aclose()
            return _client_gone()
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            images: list[dict[str, Any]] = []
            cid = turn.request_id
            try:
                yield _sse(chunk_body(cid, name, {"role": "assistant", "content": ""}, None))
                async for event in _chain(buffered, stream):
                    kind = event.WhichOneof("event")
                    if kind == "image":
                        images.append(_image_info(event.image))
                    elif kind == "delta":
                        yield _sse(chunk_body(cid, name, {"content": event.delta}, None))
                    elif kind == "final":
                        final = event.final
                        extra = _final_extra(final, images)
                        yield _sse(chunk_body(cid, name, {}, FINISH_REASONS[final.finish_reason], extra=extra))
                        if include_usage:
                            yield _sse(chunk_body(cid, name, None, None, usage=usage_body(final.usage)))
            except ServingError as error:
                yield _sse(error_body(error))
            finally:
                await stream.aclose()
            yield "data: [DONE]\n\n"

        return _ClosingStreamingResponse(events(), stream, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _cancelled_when_gone(request: Request, task: asyncio.Task[Any]) -> bool:
    """Wait for `task`; if the client disconnects first, cancel it (which cancels the LLM call) and return
    True. The task's own exception is raised."""
    while not task.done():
        await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return True
    task.result()
    return False


def _client_gone() -> JSONResponse:
    return JSONResponse(error_body(ServingError(ErrorCode.CANCELLED, "client went away")), 499)


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
