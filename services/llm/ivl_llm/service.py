"""The LLM service's domain logic, transport-free: prompt checks, slots, streaming text deltas, usage."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from ivl_proto.errors import ErrorCode, ServingError

from ivl_llm.backends.base import Backend
from ivl_llm.checkpoint import LLMCheckpoint, load_tokenizer, read_checkpoint
from ivl_llm.decoding import IncrementalDetokenizer, StopStringMatcher
from ivl_llm.prompt import ImageEmbedding, PromptBuilder
from ivl_llm.sampling import Sampling
from ivl_llm.scheduler import Scheduler
from ivl_llm.settings import LLMSettings
from ivl_llm.templates import ChatMessage, get_template

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: tuple[int, ...]  # the generated tokens this delta covers

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    total_s: float


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length | cancelled
    usage: Usage


def make_backend(settings: LLMSettings, checkpoint: LLMCheckpoint) -> Backend:
    if settings.backend == "lmdeploy":
        from ivl_llm.backends.lmdeploy_backend import LMDeployBackend

        return LMDeployBackend.from_settings(settings, checkpoint)
    from ivl_llm.backends.hf import TransformersBackend

    return TransformersBackend(checkpoint, settings.dtype, settings.device, settings.max_concurrency, settings.torch_threads)


class LLMService:
    def __init__(self, settings: LLMSettings, backend: Backend | None = None, tokenizer: Any = None) -> None:
        self.settings = settings
        self.checkpoint = read_checkpoint(settings.model_path, settings.template, settings.system_message)
        self.tokenizer = tokenizer or load_tokenizer(settings.model_path, settings.trust_remote_code)
        self.template = get_template(self.checkpoint.template)
        self.context_length = settings.context_length or self.checkpoint.context_length
        self.builder = PromptBuilder(
            self.tokenizer, self.template, self.checkpoint.hidden_size, self.context_length, self.checkpoint.system_message
        )
        self.stop_token_ids = self._stop_token_ids()
        self.scheduler = Scheduler(settings.max_concurrency, settings.max_queue)
        self.backend = backend or make_backend(settings, self.checkpoint)
        self.ready = False

    def _stop_token_ids(self) -> frozenset[int]:
        ids = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids(self.template.stop_token)}
        return frozenset(int(i) for i in ids if i is not None and i != self.tokenizer.unk_token_id)

    async def start(self) -> None:
        await self.backend.start()
        if self.settings.warmup and hasattr(self.backend, "warm_up"):
            warm = self.tokenizer("hello", add_special_tokens=True)["input_ids"]
            await self.backend.warm_up([int(i) for i in warm])
        self.ready = True

    async def close(self) -> None:
        self.ready = False
        await self.backend.close()

    def info(self) -> dict[str, Any]:
        return {
            "model_id": self.checkpoint.model_id,
            "template": self.template.name,
            "context_length": self.context_length,
            "hidden_size": self.checkpoint.hidden_size,
            "backend": self.backend.info.name,
            "dtype": self.backend.info.dtype,
            "device": self.backend.info.device,
            "max_concurrency": self.settings.max_concurrency,
            "max_queue": self.settings.max_queue,
            "random_weights": self.checkpoint.random_weights,
            "demo_model": self.checkpoint.demo_model,
        }

    async def generate(
        self, messages: Sequence[ChatMessage], embeddings: Sequence[ImageEmbedding], sampling: Sampling
    ) -> AsyncIterator[TextDelta | Finished]:
        """Text deltas, then exactly one Finished. Closing the iterator early cancels the generation;
        its slot comes back as soon as the engine has stopped."""
        started = time.perf_counter()
        if not self.ready:
            raise ServingError(ErrorCode.UNAVAILABLE, "the LLM service is still loading its model; retry shortly")
        sampling.check(self.settings.max_new_tokens_limit)
        prompt = self.builder.prepare(messages, embeddings, sampling.max_new_tokens, self.settings.default_max_new_tokens)
        slot = await self.scheduler.acquire()
        try:
            generation = self.backend.generate(prompt, sampling, self.stop_token_ids)
        except BaseException:
            slot.release()
            raise
        generation.finished.add_done_callback(lambda _: slot.release())
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        matcher = StopStringMatcher(sampling.stop)
        count, pending, reason = 0, list[int](), FINISH_CANCELLED
        first_at = last_at = 0.0
        try:
            async for token_id in generation:
                count += 1
                last_at = time.perf_counter()
                first_at = first_at or last_at
                if token_id in self.stop_token_ids:
                    reason = FINISH_STOP
                    break
                pending.append(token_id)
                text = matcher.feed(detokenizer.push(token_id))
                if text:
                    yield TextDelta(text, tuple(pending))
                    pending = []
                if matcher.stopped:
                    reason = FINISH_STOP
                    break
            else:
                reason = FINISH_LENGTH if count >= prompt.max_new_tokens else FINISH_STOP
            if not matcher.stopped:  # what the detokenizer and the stop matcher still hold
                tail = matcher.feed(detokenizer.flush()) + matcher.flush()
                if tail or pending:
                    yield TextDelta(tail, tuple(pending))
        finally:
            generation.cancel()
        decode_s = last_at - first_at
        yield Finished(
            reason,
            Usage(
                prompt_tokens=prompt.prompt_tokens,
                completion_tokens=count,
                time_to_first_token_s=(first_at - started) if count else 0.0,
                decode_tokens_per_s=(count - 1) / decode_s if count > 1 and decode_s > 0 else 0.0,
                total_s=time.perf_counter() - started,
            ),
        )
