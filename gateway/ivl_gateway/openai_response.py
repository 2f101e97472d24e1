"""The OpenAI response shapes this gateway sends, as typed pydantic models: chat completions and their stream
chunks (choices, logprobs, tool calls, usage), models, and the error body every 4xx/5xx carries."""

from __future__ import annotations

import time
from typing import Any, Literal

from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ERROR_TABLE, ServingError
from pydantic import BaseModel, Field

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "stop",
    common_pb2.FINISH_REASON_UNSPECIFIED: "stop",
}


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens the LLM served from its prefix KV cache (earlier turns of the chat)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    ivl: dict[str, Any]  # this server's extra: per-image plans and cache hits, vision seconds, TTFT, tokens/s


class ToolCallDelta(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    ivl: dict[str, Any] | None = None

    def body(self) -> dict[str, Any]:
        """The chunk as sent: delta fields that are not set are left out (OpenAI's shape)."""
        out = self.model_dump(exclude={"usage", "ivl", "choices"})
        out["choices"] = [
            {**c.model_dump(exclude={"delta"}), "delta": c.delta.model_dump(exclude_none=True)} for c in self.choices
        ]
        if self.usage is not None:
            out["usage"] = self.usage.model_dump()
        if self.ivl is not None:
            out["ivl"] = self.ivl
        return out


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "ivl"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(error: ServingError) -> dict[str, Any]:
    mapping = ERROR_TABLE[error.code]
    detail = ErrorDetail(message=error.message, type=mapping.openai_type, param=getattr(error, "param", None),
                         code=getattr(error, "api_code", None) or error.code.value)
    return ErrorResponse(error=detail).model_dump()


def usage_of(usage: common_pb2.Usage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_prompt_tokens),
    )


def logprobs_of(entries: list[common_pb2.TokenLogprob]) -> list[TokenLogprob]:
    return [
        TokenLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token_bytes),
                     top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token_bytes)) for t in e.top])
        for e in entries
    ]


def usage_body(usage: common_pb2.Usage) -> dict[str, Any]:
    return usage_of(usage).model_dump()
