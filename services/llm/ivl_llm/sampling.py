"""Sampling parameters of one request, validated, with the service's defaults filled in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ivl_proto.errors import invalid

MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_STOP_TOKEN_IDS = 64

GuidedKind = Literal["json_object", "json_schema", "tool_calls"]


@dataclass(frozen=True)
class Guided:
    """A grammar the output must follow (compiled by ivl_llm.guided)."""

    kind: GuidedKind
    json_schema: str = ""  # kind json_schema: the schema as JSON text
    call_schemas: tuple[str, ...] = ()  # kind tool_calls: one schema per function, for {"name", "arguments"}
    required: bool = False  # tool_calls: only calls (at least one); False: free text, calls optional
    parallel: bool = False  # tool_calls: more than one call allowed


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int | None = None  # None: the service default, fitted to the context length
    temperature: float = 0.0  # 0 = greedy, as the reference chat() defaults to
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    guided: Guided | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def check(self, max_new_tokens_limit: int, vocab_size: int | None = None, max_n: int = 16) -> Sampling:
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise invalid(f"max_new_tokens (OpenAI max_tokens) is {self.max_new_tokens}; this server generates 1.."
                          f"{max_new_tokens_limit} tokens per request (IVL_LLM_MAX_NEW_TOKENS_LIMIT)")
        if not 0.0 <= self.temperature <= 100.0:
            raise invalid(f"temperature is {self.temperature}; it must be 0 (greedy) .. 100")
        if not 0.0 < self.top_p <= 1.0:
            raise invalid(f"top_p is {self.top_p}; it must be in (0, 1]")
        if self.top_k < 0:
            raise invalid(f"top_k is {self.top_k}; it must be 0 (off) or positive")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise invalid(f"repetition_penalty is {self.repetition_penalty}; it must be in (0, 10]")
        if len(self.stop) > 16 or any(len(s) > 256 for s in self.stop):
            raise invalid("at most 16 stop strings of at most 256 characters each")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise invalid(f"{name} is {value}; it must be between -2 and 2")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise invalid(f"logit_bias has {len(self.logit_bias)} entries; the limit is {MAX_LOGIT_BIAS_ENTRIES}")
        for token_id, bias in self.logit_bias:
            if not -100.0 <= bias <= 100.0:
                raise invalid(f"logit_bias of token {token_id} is {bias}; it must be between -100 and 100")
        self._check_ids("logit_bias", [t for t, _ in self.logit_bias], vocab_size)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise invalid(f"stop_token_ids has {len(self.stop_token_ids)} ids; the limit is {MAX_STOP_TOKEN_IDS}")
        self._check_ids("stop_token_ids", self.stop_token_ids, vocab_size)
        if self.min_new_tokens < 0:
            raise invalid(f"min_tokens is {self.min_new_tokens}; it must be 0 or more")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise invalid(f"min_tokens is {self.min_new_tokens}; it must not exceed max_tokens ({self.max_new_tokens})")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise invalid(f"top_logprobs is {self.top_logprobs}; it must be between 0 and {MAX_TOP_LOGPROBS}")
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs needs logprobs: set logprobs to true")
        if not 1 <= self.n <= max_n:
            raise invalid(f"n is {self.n}; it must be between 1 and {max_n} (IVL_LLM_MAX_N)")
        return self

    @staticmethod
    def _check_ids(name: str, ids: tuple[int, ...] | list[int], vocab_size: int | None) -> None:
        for token_id in ids:
            if token_id < 0 or (vocab_size is not None and token_id >= vocab_size):
                bound = f"0..{vocab_size - 1}" if vocab_size is not None else "0 or more"
                raise invalid(f"{name}: token id {token_id} is not in the model's vocabulary ({bound})")
