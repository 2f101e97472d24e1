"""From a validated OpenAI request to the API-independent ChatTurn: messages (images fetched, `detail` as
per-image tiling, tool calls and tool results as text), sampling parameters and tiling options."""

from __future__ import annotations

from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import invalid

from ivl_gateway.conversation import ChatMessage, ChatTurn, ImagePart
from ivl_gateway.image_fetch import ImageFetcher
from ivl_gateway.openai_request import ChatCompletionRequest, ContentPart, Message
from ivl_gateway.settings import GatewaySettings
from ivl_gateway.tool_calls import call_text, guided_tool_calls, response_text, tools_system_text

ROLES = {
    "system": common_pb2.ROLE_SYSTEM, "developer": common_pb2.ROLE_SYSTEM, "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT, "tool": common_pb2.ROLE_USER,
}


def detail_tiling(detail: str | None, settings: GatewaySettings) -> common_pb2.TilingOptions | None:
    """OpenAI's image detail: low = one 448 px tile (no split, so no thumbnail), high = the configured maximum
    (IVL_GATEWAY_DETAIL_HIGH_MAX_TILES), auto or unset = the request's / the defaults."""
    if detail == "low":
        return common_pb2.TilingOptions(max_tiles=1, min_tiles=1)
    if detail == "high":
        return common_pb2.TilingOptions(max_tiles=settings.detail_high_max_tiles)
    return None


async def _parts(message: Message, index: int, fetcher: ImageFetcher, settings: GatewaySettings) -> list[str | bytes | ImagePart]:
    content = message.content
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    parts: list[str | bytes | ImagePart] = []
    for p_index, part in enumerate(content):
        parts.append(await _part(part, index, p_index, fetcher, settings))
    return parts


async def _part(part: ContentPart, index: int, p_index: int, fetcher: ImageFetcher, settings: GatewaySettings) -> str | ImagePart:
    if part.type == "text":
        return part.text or ""
    if part.image_url is None:
        raise invalid(f"message {index}, part {p_index}: an image_url part needs 'image_url': {{'url': ...}}")
    data = await fetcher.load(part.image_url.url)
    return ImagePart(data, detail_tiling(part.image_url.detail, settings))


def _text_only(parts: list[str | bytes | ImagePart], index: int, role: str) -> str:
    if any(not isinstance(p, str) for p in parts):
        raise invalid(f"message {index}: a {role} message may hold text only; images go in user messages")
    return "".join(p for p in parts if isinstance(p, str))


async def messages_from_request(
    body: ChatCompletionRequest, fetcher: ImageFetcher, settings: GatewaySettings
) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    tool_turn: ChatMessage | None = None  # consecutive tool results share one user turn
    for index, message in enumerate(body.messages):
        parts = await _parts(message, index, fetcher, settings)
        if message.role == "tool":
            text = response_text(_text_only(parts, index, "tool"))
            if tool_turn is None:
                tool_turn = ChatMessage(role=common_pb2.ROLE_USER, parts=[text])
                messages.append(tool_turn)
            else:
                tool_turn.parts.append("\n" + text)
            continue
        tool_turn = None
        if message.role == "assistant":
            texts = [_text_only(parts, index, "assistant")] if parts else []
            calls = [call_text(c.function.name, c.function.arguments) for c in message.tool_calls or []]
            parts = ["\n".join(t for t in [*texts, *calls] if t)] if calls else texts
        elif message.tool_calls:
            raise invalid(f"message {index}: only assistant messages carry tool_calls", f"messages[{index}].tool_calls")
        messages.append(ChatMessage(role=ROLES[message.role], parts=parts))
    if body.tool_choice_mode != "none":
        tools_text = tools_system_text(body.tools or [])
        if messages and messages[0].role == common_pb2.ROLE_SYSTEM:
            messages[0].parts.append("\n\n" + tools_text)
        else:  # the functions need a system message; it replaces the checkpoint's default one
            messages.insert(0, ChatMessage(role=common_pb2.ROLE_SYSTEM, parts=[tools_text]))
    return messages


def sampling_from_request(body: ChatCompletionRequest) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams()
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "presence_penalty", "frequency_penalty",
                 "top_logprobs"):
        value = getattr(body, name)
        if value is not None:
            setattr(params, name, value)
    max_new = body.max_completion_tokens or body.max_tokens
    if max_new is not None:
        params.max_new_tokens = max_new
    if body.stop:
        params.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    for key, bias in (body.logit_bias or {}).items():
        params.logit_bias[int(key)] = bias
    if body.min_tokens:
        params.min_new_tokens = body.min_tokens
    params.stop_token_ids.extend(body.stop_token_ids or [])
    params.logprobs = body.logprobs
    if body.n != 1:
        params.n = body.n
    mode = body.tool_choice_mode
    if mode != "none":
        named = body.tool_choice.function.name if mode == "named" else None  # type: ignore[union-attr]
        parallel = body.parallel_tool_calls if body.parallel_tool_calls is not None else True
        params.guided.CopyFrom(guided_tool_calls(body.tools or [], mode, named, parallel))
    elif body.response_format is not None and body.response_format.type == "json_object":
        params.guided.json_object = True
    elif body.response_format is not None and body.response_format.type == "json_schema":
        params.guided.json_schema = body.response_schema() or "{}"
    return params


def tiling_from_request(body: ChatCompletionRequest) -> common_pb2.TilingOptions:
    options = common_pb2.TilingOptions()
    if body.max_tiles is not None:
        options.max_tiles = body.max_tiles
    if body.min_tiles is not None:
        options.min_tiles = body.min_tiles
    if body.use_thumbnail is not None:
        options.use_thumbnail = body.use_thumbnail
    return options


async def turn_from_request(
    body: ChatCompletionRequest, fetcher: ImageFetcher, settings: GatewaySettings, request_id: str
) -> ChatTurn:
    return ChatTurn(
        messages=await messages_from_request(body, fetcher, settings),
        sampling=sampling_from_request(body),
        tiling=tiling_from_request(body),
        request_id=request_id,
    )
