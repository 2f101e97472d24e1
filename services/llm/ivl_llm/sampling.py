"""Sampling parameters of one request, validated, with the service's defaults filled in."""

from __future__ import annotations

from dataclasses import dataclass, field

from ivl_proto.errors import invalid


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int | None = None  # None: the service default, fitted to the context length
    temperature: float = 0.0  # 0 = greedy, as the reference chat() defaults to
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def check(self, max_new_tokens_limit: int) -> Sampling:
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise invalid(f"max_new_tokens is {self.max_new_tokens}; it must be 1..{max_new_tokens_limit}")
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
        return self
