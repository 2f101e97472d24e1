"""What every backend offers the service: load + warm up, then streams of generated token ids."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from ivl_llm.prompt import PreparedPrompt
from ivl_llm.sampling import Sampling


@dataclass(frozen=True)
class BackendInfo:
    name: str  # "transformers" | "lmdeploy"
    dtype: str
    device: str


@dataclass(frozen=True)
class TokenOut:
    """One generated token of one choice; logprob/top only when the request asked for logprobs."""

    token_id: int
    choice: int = 0
    logprob: float | None = None  # natural log of its probability under the model's raw distribution
    top: tuple[tuple[int, float], ...] = ()  # the most likely (token id, logprob) pairs at this position


# Builds one grammar matcher per choice (ivl_llm.guided.RowMatchers) for a request that is guided.
MatcherFactory = Callable[[int], Any]


@dataclass(frozen=True)
class PrefillStats:
    """How the prompt of one generation was processed."""

    prompt_tokens: int
    cached_tokens: int  # leading prompt tokens whose KV was reused instead of computed
    prefill_s: float  # computing the rest of the prompt, up to the first token's logits


class Generation(Protocol):
    """One running generation of `sampling.n` choices. Iterate it for TokenOut (a choice's last token may
    be a stop token; then that choice sends nothing more); `stop_choice(i)` ends choice i early (a stop
    string matched); `cancel()` stops the engine at its next step; `finished` resolves once the engine has
    really let go. `prefill` is set once the prompt has been processed (None if the engine does not tell)."""

    finished: asyncio.Future[None]
    prefill: PrefillStats | None

    def __aiter__(self) -> AsyncIterator[TokenOut]: ...

    def stop_choice(self, index: int) -> None: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    info: BackendInfo

    async def start(self) -> None:
        """Load the weights and warm up; the service reports SERVING only after this returns."""

    def generate(
        self, prompt: PreparedPrompt, sampling: Sampling, stop_token_ids: Collection[int],
        matchers: MatcherFactory | None = None,
    ) -> Generation:
        """Start generating (at most prompt.max_new_tokens tokens per choice; a choice stops after a stop
        token). `matchers` (transformers backend) constrains the output to the request's grammar; LMDeploy
        compiles `sampling.guided` itself."""

    async def close(self) -> None: ...
