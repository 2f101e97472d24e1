"""The OpenAI chat-completions request shape this gateway accepts, and the response/chunk bodies it sends.

Extensions (send them with the openai client's `extra_body=`): max_tiles, min_tiles, use_thumbnail,
top_k, repetition_penalty.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ERROR_TABLE, ServingError, invalid
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ivl_gateway.settings import MAX_TILES_LIMIT

ROLES = {"system": common_pb2.ROLE_SYSTEM, "developer": common_pb2.ROLE_SYSTEM, "user": common_pb2.ROLE_USER, "assistant": common_pb2.ROLE_ASSISTANT}
FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "stop",
    common_pb2.FINISH_REASON_UNSPECIFIED: "stop",
}
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
}
_SURROGATE = re.compile("[\ud800-\udfff]")


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
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
    user: str | None = None
    # Extensions.
    max_tiles: int | None = None
    min_tiles: int | None = None
    use_thumbnail: bool | None = None
    top_k: int | None = None
    repetition_penalty: float | None = Field(default=None, gt=0)

    def check_ranges(self) -> None:
        """Every integer within its range (so that none can overflow a proto field), min_tiles <= max_tiles."""
        for name, (low, high) in INT_RANGES.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise invalid(f"{name} is {value}; it must be between {low} and {high}")
        if self.max_tiles is not None and self.min_tiles is not None and self.min_tiles > self.max_tiles:
            raise invalid(f"min_tiles is {self.min_tiles}; it must be between 1 and max_tiles ({self.max_tiles})")
        if self.n != 1:
            raise invalid(f"n is {self.n}; this gateway returns one choice (n=1)")

    def sampling(self) -> common_pb2.SamplingParams:
        params = common_pb2.SamplingParams()
        if self.temperature is not None:
            params.temperature = self.temperature
        if self.top_p is not None:
            params.top_p = self.top_p
        if self.top_k is not None:
            params.top_k = self.top_k
        if self.repetition_penalty is not None:
            params.repetition_penalty = self.repetition_penalty
        max_new = self.max_completion_tokens or self.max_tokens
        if max_new is not None:
            params.max_new_tokens = max_new
        if self.seed is not None:
            params.seed = self.seed
        if self.stop:
            params.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop)
        return params

    def tiling(self) -> common_pb2.TilingOptions:
        options = common_pb2.TilingOptions()
        if self.max_tiles is not None:
            options.max_tiles = self.max_tiles
        if self.min_tiles is not None:
            options.min_tiles = self.min_tiles
        if self.use_thumbnail is not None:
            options.use_thumbnail = self.use_thumbnail
        return options


def parse_request(body: Any) -> ChatCompletionRequest:
    """The decoded JSON body as a request, or a ServingError (400) that names the field at fault."""
    check_unicode(body)
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise invalid(f"invalid request body at '{where}': {first.get('msg')}") from None
    request.check_ranges()
    return request


def check_unicode(body: Any) -> None:
    """Refuse lone surrogates (JSON escapes such as \\ud800 without their pair) anywhere in the body.

    They decode to Python strings that cannot be encoded as UTF-8, so they could reach neither a
    proto string field nor a JSON reply. Walks iteratively: the depth is bounded only by the parser.
    """
    pending: list[tuple[tuple[str | int, ...], Any]] = [((), body)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
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


def error_body(error: ServingError) -> dict[str, Any]:
    mapping = ERROR_TABLE[error.code]
    return {"error": {"message": error.message, "type": mapping.openai_type, "code": error.code.value, "param": None}}


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(
    completion_id: str, model: str, text: str, finish: str, usage: common_pb2.Usage, extra: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": usage_body(usage),
        "ivl": extra,
    }


def usage_body(usage: common_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        # prompt tokens the LLM served from its prefix KV cache (earlier turns of the chat)
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def chunk_body(
    completion_id: str, model: str, delta: dict[str, Any] | None, finish: str | None,
    usage: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    if usage is not None:
        body["usage"] = usage
    if extra is not None:
        body["ivl"] = extra
    return body
