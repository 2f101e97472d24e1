"""What every backend offers the service: load + warm up, then streams of generated token ids."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import Protocol

from ivl_llm.prompt import PreparedPrompt
from ivl_llm.sampling import Sampling


@dataclass(frozen=True)
class BackendInfo:
    name: str  # "transformers" | "lmdeploy"
    dtype: str
    device: str


@dataclass(frozen=True)
class PrefillStats:
    """How the prompt of one generation was processed."""

    prompt_tokens: int
    cached_tokens: int  # leading prompt tokens whose KV was reused instead of computed
    prefill_s: float  # computing the rest of the prompt, up to the first token's logits


class Generation(Protocol):
    """One running generation. Iterate it for token ids (the last may be a stop token); `cancel()`
    stops the engine at its next step; `finished` resolves once the engine has really let go.
    `prefill` is set once the prompt has been processed (None if the engine does not tell)."""

    finished: asyncio.Future[None]
    prefill: PrefillStats | None

    def __aiter__(self) -> AsyncIterator[int]: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    info: BackendInfo

    async def start(self) -> None:
        """Load the weights and warm up; the service reports SERVING only after this returns."""

    def generate(self, prompt: PreparedPrompt, sampling: Sampling, stop_token_ids: Collection[int]) -> Generation:
        """Start generating (at most prompt.max_new_tokens tokens; stops after a stop token)."""

    async def close(self) -> None: ...
