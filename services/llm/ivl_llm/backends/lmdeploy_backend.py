"""LMDeploy TurboMind backend (GPU; optional extra `ivl-llm[lmdeploy]`, imported lazily).

TurboMind loads only the language model of an InternVL checkpoint (its InternVL reader skips the
vision weights; `language_model_only=True` is passed where the installed version knows it). Each request
sends `input_ids` + `input_embeddings` (one tensor per image) + `input_embedding_ranges` ([start, end)
of each image's '<IMG_CONTEXT>' run) to one engine instance taken from a pool; cancelling closes the
stream, which makes TurboMind cancel the sequence, then the session is ended and the instance returned.

Checked against LMDeploy 0.18.0's Python layer (tests/llm/test_lmdeploy_contract.py). Prefix caching
(`enable_prefix_caching`, `cache_prompt`, `cache_generation`) is switched on from settings; TurboMind's
scheduler leaves requests that carry `input_embeddings` out of it (Scheduler::PrefixEligible in its C++
source), so it reuses the KV of text-only requests, and `cached_tokens` of its request metrics tells
how many prompt tokens it reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ivl_proto.dtypes import to_torch
from ivl_proto.errors import ErrorCode, ServingError

from ivl_llm.backends.base import BackendInfo, MatcherFactory, PrefillStats, TokenOut
from ivl_llm.checkpoint import LLMCheckpoint
from ivl_llm.guided import tool_calls_structural_tag
from ivl_llm.prompt import ImageEmbedding, PreparedPrompt
from ivl_llm.sampling import Guided, Sampling

if TYPE_CHECKING:  # pydantic-settings is not needed to drive the backend directly (GPU scripts)
    from ivl_llm.settings import LLMSettings

log = logging.getLogger(__name__)

OK_STATUSES = ("SUCCESS", "FINISH", "CANCEL")
# lmdeploy.messages.ResponseType names -> what the caller can do about it
FAILED_STATUSES = {
    "INPUT_LENGTH_ERROR": (ErrorCode.INVALID_ARGUMENT, "the prompt is longer than TurboMind's session_len"),
    "NO_QUEUE": (ErrorCode.RESOURCE_EXHAUSTED, "TurboMind's request queue is full; retry shortly"),
    "OUT_OF_MEMORY": (ErrorCode.RESOURCE_EXHAUSTED, "TurboMind ran out of KV cache memory; retry shortly"),
}
MAX_TEMPERATURE = 2.0  # lmdeploy.GenerationConfig asserts 0 <= temperature <= 2
# Older TurboMind instances took these per call; 0.18's async_stream_infer has no such parameters.
LEGACY_STREAM_ARGS = {"sequence_start": True, "sequence_end": True, "step": 0}
BAN_BIAS = -100.0  # OpenAI's logit_bias -100 bans a token: TurboMind's bad_token_ids
_DONE = object()


@dataclass(frozen=True)
class LMDeployAPI:
    """The three lmdeploy names this backend uses (a fake stands in for them in tests)."""

    turbomind: Any  # lmdeploy.turbomind.TurboMind
    engine_config: Any  # lmdeploy.TurbomindEngineConfig
    generation_config: Any  # lmdeploy.GenerationConfig


def load_lmdeploy_api() -> LMDeployAPI:
    try:
        from lmdeploy import GenerationConfig, TurbomindEngineConfig
        from lmdeploy.turbomind import TurboMind
    except ImportError as error:
        raise ServingError(
            ErrorCode.FAILED_PRECONDITION,
            f"the lmdeploy backend needs LMDeploy on a CUDA machine: pip install 'ivl-llm[lmdeploy]' ({error})",
        ) from error
    return LMDeployAPI(TurboMind, TurbomindEngineConfig, GenerationConfig)


def embedding_for_engine(embedding: ImageEmbedding) -> Any:
    """A torch tensor in the dtype it came in (TurboMind casts it to its weight type)."""
    return to_torch(embedding.array, embedding.dtype)


def stream_arguments(instance: Any) -> dict[str, Any]:
    """The legacy per-call arguments the instance's async_stream_infer still names (none in 0.18)."""
    try:
        named = inspect.signature(instance.async_stream_infer).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in LEGACY_STREAM_ARGS.items() if k in named}


def failure(status: str) -> ServingError:
    code, message = FAILED_STATUSES.get(status, (ErrorCode.INTERNAL, "TurboMind failed the request"))
    return ServingError(code, f"{message} ({status})")


def response_format(guided: Guided) -> dict[str, Any]:
    """LMDeploy's GenerationConfig.response_format for a guided request (it compiles it with xgrammar)."""
    if guided.kind == "json_object":
        return {"type": "json_object"}
    if guided.kind == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": json.loads(guided.json_schema)}}
    return tool_calls_structural_tag(guided)


def unsupported(field: str, why: str) -> ServingError:
    return ServingError(ErrorCode.INVALID_ARGUMENT, f"{field} is not supported by the lmdeploy backend: {why}")


def token_outs(output: Any, choice: int, sampling: Sampling) -> list[TokenOut]:
    """TurboMind's output ids, with their logprobs when asked for: `output.logprobs` is one {id: logprob}
    dict per output token (its top-N and the chosen token)."""
    ids = [int(t) for t in output.token_ids]
    rows = getattr(output, "logprobs", None) if sampling.logprobs else None
    if not rows:
        return [TokenOut(t, choice) for t in ids]
    out = []
    for token_id, row in zip(ids, rows, strict=False):
        ranked = sorted(((int(k), float(v)) for k, v in row.items()), key=lambda kv: -kv[1])
        out.append(TokenOut(token_id, choice, float(row.get(token_id, float("-inf"))),
                            tuple(ranked[: sampling.top_logprobs])))
    return out + [TokenOut(t, choice) for t in ids[len(out):]]


class LMDeployGeneration:
    """`sampling.n` requests (one per choice, each on a pooled TurboMind instance) merged into one stream of
    TokenOut; stop_choice(i) closes choice i's stream, cancel() all of them."""

    def __init__(self, backend: LMDeployBackend, prompt: PreparedPrompt, sampling: Sampling, stops: list[int]) -> None:
        self._backend = backend
        self._prompt = prompt
        self._sampling = sampling
        self._started = False
        self._closing: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._choices: list[asyncio.Task[None]] = []
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.prefill: PrefillStats | None = None
        # invalid values fail here, before any instance is taken
        self._gen_configs = [backend.generation_config(prompt, sampling, stops, i) for i in range(sampling.n)]
        self._tokens = self._run()

    def __aiter__(self) -> AsyncIterator[TokenOut]:
        return self._tokens

    def stop_choice(self, index: int) -> None:
        if index < len(self._choices):
            self._choices[index].cancel()

    def cancel(self) -> None:
        if self._closing is not None:
            return
        if not self._started and not self.finished.done():
            self.finished.set_result(None)
        self._closing = asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        # RuntimeError: still running in the consumer's task, whose cancellation closes it.
        with contextlib.suppress(RuntimeError):
            await self._tokens.aclose()

    def _prefill_stats(self, output: Any, elapsed_s: float) -> PrefillStats:
        """Prompt tokens TurboMind reused (its request metrics, when enable_metrics is on) and the time to
        the first output (queueing inside the engine included: TurboMind does not report prefill alone)."""
        metrics = getattr(output, "req_metrics", None)
        cached = int(getattr(metrics, "cached_tokens", 0) or 0)
        return PrefillStats(len(self._prompt.input_ids), cached, elapsed_s)

    async def _run(self) -> AsyncIterator[TokenOut]:
        self._started = True
        self._choices = [asyncio.ensure_future(self._run_choice(i)) for i in range(self._sampling.n)]
        remaining = len(self._choices)
        try:
            while remaining:
                item = await self._queue.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item  # type: ignore[misc]
        finally:
            for task in self._choices:
                task.cancel()
            await asyncio.gather(*self._choices, return_exceptions=True)
            if not self.finished.done():
                self.finished.set_result(None)

    async def _run_choice(self, choice: int) -> None:
        try:
            async for token in self._stream(choice):
                self._queue.put_nowait(token)
        except asyncio.CancelledError:
            pass  # stop_choice() or cancel(): the stream was closed, which cancels the sequence
        except BaseException as error:  # handed to the consumer, raised there
            self._queue.put_nowait(error)
        finally:
            self._queue.put_nowait(_DONE)

    async def _stream(self, choice: int) -> AsyncIterator[TokenOut]:
        backend = self._backend
        instance = await backend.pool.get()
        session_id = next(backend.session_ids)
        try:
            started = time.perf_counter()
            stream = instance.async_stream_infer(
                session_id,
                list(self._prompt.input_ids),
                input_embeddings=[embedding_for_engine(e) for e in self._prompt.embeddings] or None,
                input_embedding_ranges=[list(r) for r in self._prompt.embedding_ranges] or None,
                gen_config=self._gen_configs[choice],
                stream_output=True,
                **stream_arguments(instance),
            )
            try:
                async for output in stream:
                    status = getattr(output.status, "name", str(output.status))
                    if status not in OK_STATUSES:
                        raise failure(status)
                    if self.prefill is None and output.token_ids:
                        self.prefill = self._prefill_stats(output, time.perf_counter() - started)
                    for token in token_outs(output, choice, self._sampling):
                        yield token
            finally:
                await stream.aclose()  # TurboMind cancels the sequence when its stream is closed early
                try:
                    await instance.async_end(session_id)
                except Exception:  # ending a finished session is best effort
                    log.debug("async_end(%s) failed", session_id, exc_info=True)
        finally:
            backend.pool.put_nowait(instance)


class LMDeployBackend:
    def __init__(self, checkpoint: LLMCheckpoint, settings: LLMSettings, api: LMDeployAPI | None = None) -> None:
        self.checkpoint = checkpoint
        self.settings = settings
        self.api = api
        self.info = BackendInfo(name="lmdeploy", dtype=settings.dtype, device="cuda")
        self.instances = settings.instances or settings.max_concurrency
        self.session_ids = itertools.count(1)
        self.pool: asyncio.Queue[Any] = asyncio.Queue()
        self.engine: Any = None

    @classmethod
    def from_settings(cls, settings: LLMSettings, checkpoint: LLMCheckpoint) -> LMDeployBackend:
        return cls(checkpoint, settings)

    def engine_values(self) -> dict[str, Any]:
        """Every TurbomindEngineConfig field this backend sets (0.18 knows them all)."""
        settings = self.settings
        return {
            "tp": settings.tp,
            "session_len": settings.session_len or settings.context_length or self.checkpoint.context_length,
            "cache_max_entry_count": settings.cache_max_entry_count,
            "max_batch_size": self.instances,
            "dtype": {"float32": "auto"}.get(settings.dtype, settings.dtype),
            "language_model_only": True,
            "enable_prefix_caching": settings.enable_prefix_caching,
            "cache_prompt": settings.cache_prompt,
            "cache_generation": settings.cache_generation,
            "enable_metrics": True,  # per-request cached_tokens
        }

    def engine_config(self) -> Any:
        api = self.api or load_lmdeploy_api()
        values = self.engine_values()
        if dataclasses.is_dataclass(api.engine_config):  # older versions lack some fields: leave those out
            known = {f.name for f in dataclasses.fields(api.engine_config)}
            dropped = sorted(set(values) - known)
            if dropped:
                log.warning("this LMDeploy's TurbomindEngineConfig has no %s; running without", ", ".join(dropped))
            values = {k: v for k, v in values.items() if k in known}
        return api.engine_config(**values)

    async def start(self) -> None:
        self.api = self.api or load_lmdeploy_api()
        config = self.engine_config()
        loop = asyncio.get_running_loop()
        self.engine = await loop.run_in_executor(
            None, lambda: self.api.turbomind.from_pretrained(str(self.checkpoint.path), engine_config=config)
        )
        for _ in range(self.instances):
            self.pool.put_nowait(self.engine.create_instance())

    def generation_config(self, prompt: PreparedPrompt, sampling: Sampling, stops: list[int], choice: int = 0) -> Any:
        """LMDeploy's GenerationConfig for one choice. Fields TurboMind has no way to honour are refused by name
        (never dropped): presence/frequency penalties, logit_bias other than -100 (a ban: bad_token_ids)."""
        assert self.api is not None
        if sampling.temperature > MAX_TEMPERATURE:
            raise ServingError(
                ErrorCode.INVALID_ARGUMENT,
                f"temperature is {sampling.temperature}; the lmdeploy backend accepts 0 (greedy) .. {MAX_TEMPERATURE}",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(sampling, name):
                raise unsupported(name, "TurboMind's sampling has no such parameter; use repetition_penalty")
        banned = [token_id for token_id, bias in sampling.logit_bias if bias <= BAN_BIAS]
        biased = [(token_id, bias) for token_id, bias in sampling.logit_bias if bias > BAN_BIAS]
        if biased:
            token_id, bias = biased[0]
            raise unsupported("logit_bias", f"TurboMind can only ban tokens (bias -100); token {token_id} has bias {bias}")
        values: dict[str, Any] = {
            "max_new_tokens": prompt.max_new_tokens,
            "do_sample": not sampling.greedy,
            "temperature": sampling.temperature if not sampling.greedy else 1.0,
            "top_p": sampling.top_p,
            # TurboMind ignores do_sample: greedy is top_k=1 (its sampling layer takes top_k/top_p/temperature).
            "top_k": sampling.top_k if not sampling.greedy else 1,
            "repetition_penalty": sampling.repetition_penalty,
            "random_seed": sampling.seed + choice if sampling.seed is not None else None,
            "stop_token_ids": stops,
        }
        if banned:
            values["bad_token_ids"] = sorted(banned)
        if sampling.min_new_tokens:
            values["min_new_tokens"] = sampling.min_new_tokens
        if sampling.logprobs:
            values["logprobs"] = max(1, sampling.top_logprobs)  # the chosen token's logprob comes with its top-N
        if sampling.guided is not None:
            values["response_format"] = response_format(sampling.guided)
        return self.api.generation_config(**values)

    def generate(
        self, prompt: PreparedPrompt, sampling: Sampling, stop_token_ids: Collection[int],
        matchers: MatcherFactory | None = None,
    ) -> LMDeployGeneration:
        """`matchers` is not used: TurboMind compiles `sampling.guided` (as response_format) with its own xgrammar."""
        return LMDeployGeneration(self, prompt, sampling, sorted(int(i) for i in stop_token_ids))

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None and hasattr(engine, "close"):
            engine.close()
