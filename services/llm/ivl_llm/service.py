"""The LLM service's domain logic, transport-free: prompt checks, slots, streaming text deltas, usage."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ivl_proto.errors import ErrorCode, ServingError
from opentelemetry import trace

from ivl_llm.backends.base import Backend, MatcherFactory, TokenOut
from ivl_llm.checkpoint import LLMCheckpoint, load_tokenizer, read_checkpoint
from ivl_llm.decoding import IncrementalDetokenizer, ReplyStripper, StopStringMatcher
from ivl_llm.guided import GuidedDecoder
from ivl_llm.metrics import LLMMetrics
from ivl_llm.prompt import ImageEmbedding, PromptBuilder
from ivl_llm.sampling import Sampling
from ivl_llm.scheduler import Scheduler
from ivl_llm.settings import LLMSettings
from ivl_llm.templates import ChatMessage, get_template

log = logging.getLogger(__name__)
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str  # the token's own bytes as text (a partial UTF-8 character shows as U+FFFD)
    logprob: float
    token_bytes: bytes
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: tuple[int, ...]  # the generated tokens this delta covers
    index: int = 0  # the choice
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked for logprobs

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
    cached_prompt_tokens: int = 0  # leading prompt tokens whose KV was reused (not computed again)
    prefill_s: float = 0.0  # the engine's time for the rest of the prompt (0 when it does not tell)


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length | cancelled (of choice 0)
    usage: Usage
    choice_reasons: tuple[str, ...] = ()  # one per choice


@dataclass
class _Choice:
    """The text side of one choice: detokenizer, stop strings, the reference's strip, what is not sent yet."""

    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher
    stripper: ReplyStripper = field(default_factory=ReplyStripper)
    pending: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    count: int = 0
    reason: str | None = None

    def take(self, text: str, index: int) -> TextDelta:
        delta = TextDelta(text, tuple(self.pending), index, tuple(self.pending_logprobs))
        self.pending, self.pending_logprobs = [], []
        return delta

    def tail(self, index: int) -> TextDelta | None:
        """What the detokenizer and the stop matcher still hold (nothing after a stop string)."""
        if self.matcher.stopped:
            return None
        text = self.stripper.feed(self.matcher.feed(self.detokenizer.flush()) + self.matcher.flush())
        return self.take(text, index) if text or self.pending else None


def make_backend(settings: LLMSettings, checkpoint: LLMCheckpoint) -> Backend:
    if settings.backend == "lmdeploy":
        from ivl_llm.backends.lmdeploy_backend import LMDeployBackend

        return LMDeployBackend.from_settings(settings, checkpoint)
    from ivl_llm.backends.hf import TransformersBackend

    return TransformersBackend(
        checkpoint, settings.dtype, settings.device, settings.max_concurrency, settings.torch_threads,
        prefix_cache_bytes=settings.prefix_cache_bytes,
    )


class LLMService:
    def __init__(
        self, settings: LLMSettings, backend: Backend | None = None, tokenizer: Any = None,
        metrics: LLMMetrics | None = None,
    ) -> None:
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
        self.vocab_size = int(getattr(self.checkpoint.config, "vocab_size", 0) or len(self.tokenizer))
        self._guided: GuidedDecoder | None = None
        self._token_texts: dict[int, tuple[str, bytes]] = {}
        self.metrics = metrics or LLMMetrics()
        self.metrics.watch(self.checkpoint.model_id, lambda: self.scheduler.active, lambda: self.scheduler.waiting,
                           lambda: self.backend)
        self.tracer: trace.Tracer = trace.NoOpTracer()  # server.build_server sets the service's own
        self.ready = False

    @property
    def guided(self) -> GuidedDecoder:
        """The grammar compiler of this model's vocabulary (built on first use: xgrammar reads the vocabulary)."""
        if self._guided is None:
            self._guided = GuidedDecoder(self.tokenizer, self.vocab_size, self.stop_token_ids)
        return self._guided

    def _token_text(self, token_id: int) -> tuple[str, bytes]:
        found = self._token_texts.get(token_id)
        if found is None:
            vocab = self.guided.info.decoded_vocab
            raw = bytes(vocab[token_id]) if 0 <= token_id < len(vocab) else b""
            found = (raw.decode("utf-8", errors="replace"), raw)
            self._token_texts[token_id] = found
        return found

    def _logprob(self, token: TokenOut) -> TokenLogprob:
        def entry(token_id: int, logprob: float, top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
            text, raw = self._token_text(token_id)
            return TokenLogprob(token_id, text, logprob, raw, top)

        logprob = token.logprob if token.logprob is not None else 0.0
        return entry(token.token_id, logprob, tuple(entry(i, lp) for i, lp in token.top))

    def _stop_token_ids(self) -> frozenset[int]:
        """The template separator's token only, as the reference chat() passes eos_token_id; eos only for
        a tokenizer without that token (what the InternVL 1.5-era chat() did)."""
        for token_id in (self.tokenizer.convert_tokens_to_ids(self.template.stop_token), self.tokenizer.eos_token_id):
            if token_id is not None and token_id != self.tokenizer.unk_token_id:
                return frozenset({int(token_id)})
        return frozenset()

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
            "system_message_source": self.checkpoint.system_message_source,
            **self._prefix_cache_info(),
        }

    def _prefix_cache_info(self) -> dict[str, int]:
        stats_of = getattr(self.backend, "cache_stats", None)
        if stats_of is None:
            return {}
        stats = stats_of()
        return {
            "prefix_cache_budget_bytes": stats.budget_bytes,
            "prefix_cache_used_bytes": stats.used_bytes,
            "prefix_cache_entries": stats.entries,
        }

    async def generate(
        self, messages: Sequence[ChatMessage], embeddings: Sequence[ImageEmbedding], sampling: Sampling
    ) -> AsyncIterator[TextDelta | Finished]:
        """Text deltas (of each choice, interleaved), then exactly one Finished. Closing the iterator early
        cancels the generation; its slot comes back as soon as the engine has stopped."""
        started = time.perf_counter()
        if not self.ready:
            raise ServingError(ErrorCode.UNAVAILABLE, "the LLM service is still loading its model; retry shortly")
        sampling.check(self.settings.max_new_tokens_limit, self.vocab_size, self.settings.max_n)
        prompt = self.builder.prepare(messages, embeddings, sampling.max_new_tokens, self.settings.default_max_new_tokens)
        matchers: MatcherFactory | None = None
        if sampling.guided is not None:  # compiled for both backends: a bad schema is refused, never ignored
            guided = self.guided
            compiled = await asyncio.to_thread(guided.compile, sampling.guided)
            matchers = lambda rows: guided.matchers(compiled, rows)  # noqa: E731
        stops = self.stop_token_ids | frozenset(sampling.stop_token_ids)
        with self.tracer.start_as_current_span("ivl.llm.queue", attributes={"ivl.waiting": self.scheduler.waiting}):
            slot = await self.scheduler.acquire()
        queued_s = time.perf_counter() - started
        span = self.tracer.start_span("ivl.llm.generate", attributes={
            "ivl.prompt_tokens": prompt.prompt_tokens, "ivl.images": len(embeddings), "ivl.n": sampling.n,
            "ivl.backend": self.backend.info.name, "ivl.guided": sampling.guided.kind if sampling.guided else "none"})
        try:
            generation = self.backend.generate(prompt, sampling, stops, matchers)
        except BaseException:
            slot.release()
            span.end()
            raise
        generation.finished.add_done_callback(lambda _: slot.release())
        choices = [_Choice(IncrementalDetokenizer(self.tokenizer), StopStringMatcher(sampling.stop))
                   for _ in range(sampling.n)]
        count = 0
        first_at = last_at = 0.0
        outcome = "cancelled"
        try:
            async for token in generation:
                choice = choices[token.choice]
                if choice.reason is not None:
                    continue
                count += 1
                choice.count += 1
                now = time.perf_counter()
                self.metrics.token(now - last_at if last_at else None)
                last_at = now
                first_at = first_at or last_at
                if token.token_id in stops:
                    choice.reason = FINISH_STOP
                    tail = choice.tail(token.choice)
                    if tail is not None:
                        yield tail
                else:
                    choice.pending.append(token.token_id)
                    if sampling.logprobs:
                        choice.pending_logprobs.append(self._logprob(token))
                    text = choice.stripper.feed(choice.matcher.feed(choice.detokenizer.push(token.token_id)))
                    if text:
                        yield choice.take(text, token.choice)
                    if choice.matcher.stopped:
                        choice.reason = FINISH_STOP
                        generation.stop_choice(token.choice)
                if all(c.reason is not None for c in choices):
                    break
            for index, choice in enumerate(choices):  # the engine ended these: max_new_tokens or the context
                if choice.reason is None:
                    choice.reason = FINISH_LENGTH if choice.count >= prompt.max_new_tokens else FINISH_STOP
                    tail = choice.tail(index)
                    if tail is not None:
                        yield tail
            outcome = "ok"
        except ServingError:
            outcome = "error"
            raise
        finally:
            generation.cancel()
            if outcome != "ok":
                self.metrics.request_finished(outcome)
                span.set_attribute("ivl.outcome", outcome)
                span.end()
        decode_s = last_at - first_at
        prefill = getattr(generation, "prefill", None)
        reasons = tuple(c.reason or FINISH_CANCELLED for c in choices)
        usage = Usage(
            prompt_tokens=prompt.prompt_tokens,
            completion_tokens=count,
            time_to_first_token_s=(first_at - started) if count else 0.0,
            decode_tokens_per_s=(count - 1) / decode_s if count > 1 and decode_s > 0 else 0.0,
            total_s=time.perf_counter() - started,
            cached_prompt_tokens=prefill.cached_tokens if prefill else 0,
            prefill_s=prefill.prefill_s if prefill else 0.0,
        )
        self.metrics.request_done(usage, queued_s, reasons)
        log.debug("Generate: %d prompt tokens (%d reused), %d generated in %d choice(s), %s, TTFT %.3f s",
                  usage.prompt_tokens, usage.cached_prompt_tokens, count, len(choices), ",".join(reasons),
                  usage.time_to_first_token_s)
        span.set_attributes({"ivl.completion_tokens": count, "ivl.cached_prompt_tokens": usage.cached_prompt_tokens,
                             "ivl.ttft_s": usage.time_to_first_token_s, "ivl.outcome": "ok"})
        span.end()
        yield Finished(reasons[0], usage, reasons)
