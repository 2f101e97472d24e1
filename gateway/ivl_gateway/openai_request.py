"""The OpenAI chat-completions request this gateway accepts, as typed pydantic models, and its field policy.

Every field is either supported (it has an effect) or refused with a 400 that names it; nothing is ignored.
`FIELD_POLICY` lists the OpenAI fields this server cannot honour and why; a field that is neither known nor
listed is "unknown". A field sent as null counts as not sent. `lenient=True` (IVL_GATEWAY_IGNORE_UNSUPPORTED_FIELDS,
for clients that always send some field) drops refused fields instead and reports them (`ignored`).

Extensions (the openai client's `extra_body=`): max_tiles, min_tiles, use_thumbnail, top_k, repetition_penalty,
min_tokens, stop_token_ids (vLLM's names).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from ivl_proto.errors import invalid
from ivl_proto.tiling_limits import MAX_TILES_LIMIT
from pydantic import BaseModel, ConfigDict, Field, ValidationError

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
# Inclusive ranges of the integer fields: the proto field types (int32, uint64) bound them, or tighter.
INT_RANGES: dict[str, tuple[int, int]] = {
    "max_tokens": (1, INT32_MAX),
    "max_completion_tokens": (1, INT32_MAX),
    "top_k": (0, INT32_MAX),
    "seed": (0, UINT64_MAX),
    "max_tiles": (1, MAX_TILES_LIMIT),
    "min_tiles": (1, MAX_TILES_LIMIT),
    "n": (1, 128),
    "top_logprobs": (0, 20),
    "min_tokens": (0, INT32_MAX),
}
_SURROGATE = re.compile("[\ud800-\udfff]")
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# OpenAI request fields this server refuses, and why (a 400 naming the field).
FIELD_POLICY: dict[str, str] = {
    "audio": "audio output is not supported; this model answers in text",
    "modalities": "only text output is supported (send modalities [\"text\"] or leave it out)",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this model has no reasoning-effort setting",
    "verbosity": "this model has no verbosity setting",
    "web_search_options": "web search is not supported",
    "functions": "the deprecated functions field is not supported; use tools",
    "function_call": "the deprecated function_call field is not supported; use tool_choice",
    "metadata": "stored completions are not supported, so there is nothing to attach metadata to",
    "store": "completions are not stored on this server (send store false or leave it out)",
    "service_tier": "this server has one service tier (send 'auto' or 'default', or leave it out)",
    "prompt_cache_key": "prefix caching is automatic here (prompt_tokens_details.cached_tokens reports it); "
                        "there is no cache key",
    "safety_identifier": "not used by this server",
}
# A refused field's values that are the default and therefore mean "nothing asked for": accepted.
HARMLESS_VALUES: dict[str, tuple[Any, ...]] = {
    "modalities": (["text"],),
    "store": (False,),
    "service_tier": ("auto", "default"),
}
MESSAGE_FIELD_POLICY: dict[str, str] = {
    "name": "participant names are not supported by InternVL's chat templates",
    "audio": "audio is not supported",
    "function_call": "the deprecated function_call is not supported; use tool_calls",
}
PART_TYPES = ("text", "image_url")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageUrl(StrictModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(StrictModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class FunctionCall(StrictModel):
    name: str
    arguments: str


class ToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None


class StreamOptions(StrictModel):
    include_usage: bool = False


class JsonSchemaFormat(StrictModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(StrictModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(StrictModel):
    model: str | None = None
    messages: list[Message]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = None  # integer ranges: INT_RANGES, checked by check_ranges()
    max_completion_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # accepted defaults of refused fields (HARMLESS_VALUES)
    modalities: list[str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Extensions.
    max_tiles: int | None = None
    min_tiles: int | None = None
    use_thumbnail: bool | None = None
    top_k: int | None = None
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None

    def check_ranges(self) -> None:
        """Every integer within its range (so that none can overflow a proto field), min_tiles <= max_tiles,
        and the fields that only mean something together."""
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise invalid(f"{name} is {value}; it must be between {low} and {high}", name)
        if self.max_tiles is not None and self.min_tiles is not None and self.min_tiles > self.max_tiles:
            raise invalid(f"min_tiles is {self.min_tiles}; it must be between 1 and max_tiles ({self.max_tiles})",
                          "min_tiles")
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs needs logprobs: set logprobs to true", "top_logprobs")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed with stream: true", "stream_options")
        for key in self.logit_bias or {}:
            if not key.lstrip("-").isdigit():
                raise invalid(f"logit_bias keys are token ids (integers as strings); got {key[:40]!r}", "logit_bias")
            if not 0 <= int(key) <= INT32_MAX:
                raise invalid(f"logit_bias: token id {key} is out of range", "logit_bias")
        if self.response_format is not None and self.response_format.type == "json_schema" \
                and self.response_format.json_schema is None:
            raise invalid("response_format of type json_schema needs a json_schema object", "response_format")
        for index, token_id in enumerate(self.stop_token_ids or []):
            if not 0 <= token_id <= INT32_MAX:
                raise invalid(f"stop_token_ids[{index}] is {token_id}; token ids are 0..{INT32_MAX}", "stop_token_ids")
        self._check_tools()

    def _check_tools(self) -> None:
        names = [tool.function.name for tool in self.tools or []]
        for name in names:
            if not _FUNCTION_NAME.fullmatch(name):
                raise invalid(f"tool name {name[:80]!r} must be 1-64 characters of a-z, A-Z, 0-9, _ and -", "tools")
        if len(set(names)) != len(names):
            raise invalid("tools: two tools have the same name", "tools")
        choice = self.tool_choice
        if choice is not None and not names and choice != "none":
            raise invalid("tool_choice needs tools", "tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise invalid(f"tool_choice names {choice.function.name!r}, which is not one of the tools ({', '.join(names)})",
                          "tool_choice")
        if names and self.tool_choice_mode != "none" and self.response_format is not None \
                and self.response_format.type != "text":
            raise invalid("response_format and tools cannot be combined: the output is either tool calls or the "
                          "requested format", "response_format")
        if self.parallel_tool_calls is not None and not names:
            raise invalid("parallel_tool_calls needs tools", "parallel_tool_calls")
        for tool in self.tools or []:
            if tool.function.parameters is not None and tool.function.parameters.get("type", "object") != "object":
                raise invalid(f"tool {tool.function.name!r}: parameters must be a JSON Schema of type object", "tools")

    @property
    def tool_choice_mode(self) -> str:
        """none | auto | required | named (OpenAI's default: auto when tools are given)."""
        if not self.tools:
            return "none"
        if self.tool_choice is None:
            return "auto"
        return self.tool_choice if isinstance(self.tool_choice, str) else "named"

    def response_schema(self) -> str | None:
        if self.response_format is None or self.response_format.json_schema is None:
            return None
        return json.dumps(self.response_format.json_schema.schema_)


def screen_fields(body: dict[str, Any], lenient: bool) -> list[str]:
    """Refuse (or, lenient, drop) what this server cannot honour, in place; returns the dropped field names.

    Checked before the typed models so that the message names the field and says why: a refused OpenAI field,
    an unknown field, a message field, a content part of an unsupported type."""
    dropped: list[str] = []
    known = set(ChatCompletionRequest.model_fields)
    for name in list(body):
        value = body[name]
        if value is None and name != "messages":
            del body[name]
            continue
        refusal = FIELD_POLICY.get(name)
        if refusal is not None and value in HARMLESS_VALUES.get(name, ()):
            continue
        if refusal is not None or name not in known:
            why = refusal or "it is not a field of the chat completions API this server knows"
            if lenient:
                dropped.append(name)
                del body[name]
                continue
            raise invalid(f"{name} is not supported: {why}", name)
    messages = body.get("messages")
    if isinstance(messages, list):
        for m_index, message in enumerate(messages):
            if isinstance(message, dict):
                dropped += _screen_message(m_index, message, lenient)
    return dropped


def _screen_message(m_index: int, message: dict[str, Any], lenient: bool) -> list[str]:
    dropped: list[str] = []
    for name in list(message):
        if message[name] is None:
            continue
        if name in MESSAGE_FIELD_POLICY:
            if lenient:
                dropped.append(f"messages[{m_index}].{name}")
                del message[name]
                continue
            raise invalid(f"message {m_index}: {name} is not supported: {MESSAGE_FIELD_POLICY[name]}",
                          f"messages[{m_index}].{name}")
    content = message.get("content")
    if isinstance(content, list):
        for p_index, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in PART_TYPES:
                shown = f"type {kind!r}" if isinstance(kind, str) else "a part without a type"
                raise invalid(f"message {m_index}, part {p_index}: {shown} is not supported; use 'text' or 'image_url'",
                              f"messages[{m_index}].content[{p_index}].type")
            if kind == "text" and not isinstance(part.get("text"), str):
                raise invalid(f"message {m_index}, part {p_index}: a text part needs 'text': a string",
                              f"messages[{m_index}].content[{p_index}].text")
            if kind == "image_url" and not isinstance(part.get("image_url"), dict | str):
                raise invalid(f"message {m_index}, part {p_index}: an image_url part needs 'image_url': "
                              "{'url': ...}", f"messages[{m_index}].content[{p_index}].image_url")
            if kind == "image_url" and isinstance(part.get("image_url"), str):  # a common shorthand
                part["image_url"] = {"url": part["image_url"]}
    return dropped


def parse_request(body: Any, lenient: bool = False) -> ChatCompletionRequest:
    """The decoded JSON body as a request, or a ServingError (400) that names the field at fault."""
    check_unicode(body)
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    dropped = screen_fields(body, lenient)
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = _location(first.get("loc", ()))
        raise invalid(f"invalid request body at {where}: {first.get('msg')}", where.strip("'")) from None
    request.check_ranges()
    request.__dict__["ignored"] = dropped
    return request


def ignored_fields(request: ChatCompletionRequest) -> list[str]:
    return list(request.__dict__.get("ignored", []))


def _location(loc: tuple[Any, ...]) -> str:
    """'messages.0.content' -> "message 0 'content'" (pydantic's union branch names left out)."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p.startswith(("list[", "str", "function-")) or
                                                                p in ("ContentPart", "NamedToolChoice")))]
    if len(parts) >= 2 and parts[0] == "messages" and parts[1].isdigit():
        rest = ".".join(parts[2:])
        return f"message {parts[1]}" + (f" '{rest}'" if rest else "")
    return "'" + ".".join(parts) + "'" if parts else "the request body"


def check_unicode(body: Any) -> None:
    """Refuse lone surrogates (JSON escapes such as \\ud800 without their pair) anywhere in the body.

    They decode to Python strings that cannot be encoded as UTF-8, so they could reach neither a
    proto string field nor a JSON reply. Walks iteratively: the depth is bounded only by the parser.
    """
    pending: list[tuple[tuple[str | int, ...], Any]] = [((), body)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            if value.isascii():  # CPython keeps this as a flag of the string: O(1), and no surrogate is ASCII
                continue  # (a 3.6 MB base64 image URL was a regex scan of every character)
            found = _SURROGATE.search(value)
            if found is not None:
                raise invalid(
                    f"{_field_name(path)} contains a lone surrogate (U+{ord(found.group()):04X}) at character "
                    f"{found.start()}; text must be valid Unicode (a \\uD800-\\uDFFF escape needs its pair)"
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and _SURROGATE.search(key):
                    raise invalid(f"a key of {_field_name(path)} contains a lone surrogate; "
                                  "text must be valid Unicode")
                pending.append(((*path, key), item))
        elif isinstance(value, list):
            pending.extend(((*path, index), item) for index, item in enumerate(value))


def _field_name(path: tuple[str | int, ...]) -> str:
    if len(path) >= 2 and path[0] == "messages" and isinstance(path[1], int):
        return f"message {path[1]}"
    return "'" + ".".join(str(p) for p in path) + "'" if path else "the request body"
