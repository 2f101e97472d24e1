"""LMDeploy TurboMind backend (GPU; optional extra `ivl-llm[lmdeploy]`, imported lazily).

TurboMind loads only the language model of an InternVL checkpoint (its InternVL reader skips the
vision weights; `language_model_only=True` is passed where the installed version knows it). Each request
sends `input_ids` + `input_embeddings` (one tensor per image) + `input_embedding_ranges` ([start, end)
of each image's '<IMG_CONTEXT>' run) to one engine instance taken from a pool; cancelling closes the
stream, which makes TurboMind cancel the sequence, then the session is ended and the instance returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ivl_proto.errors import ErrorCode, ServingError

from ivl_llm.backends.base import BackendInfo
from ivl_llm.checkpoint import LLMCheckpoint
from ivl_llm.prompt import ImageEmbedding, PreparedPrompt
from ivl_llm.sampling import Sampling

if TYPE_CHECKING:  # pydantic-settings is not needed to drive the backend directly (GPU scripts)
    from ivl_llm.settings import LLMSettings

log = logging.getLogger(__name__)

OK_STATUSES = ("SUCCESS", "FINISH", "CANCEL")


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
    from ivl_llm.backends.hf import embedding_to_torch

    return embedding_to_torch(embedding)


class LMDeployGeneration:
    """One request on one pooled TurboMind instance; iterate for token ids, cancel() to stop."""

    def __init__(self, backend: LMDeployBackend, prompt: PreparedPrompt, sampling: Sampling, stops: list[int]) -> None:
        self._backend = backend
        self._prompt = prompt
        self._sampling = sampling
        self._stops = stops
        self._started = False
        self._closing: asyncio.Task[None] | None = None
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tokens = self._run()

    def __aiter__(self) -> AsyncIterator[int]:
        return self._tokens

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

    async def _run(self) -> AsyncIterator[int]:
        self._started = True
        backend = self._backend
        instance = await backend.pool.get()
        session_id = next(backend.session_ids)
        try:
            stream = instance.async_stream_infer(
                session_id,
                list(self._prompt.input_ids),
                input_embeddings=[embedding_for_engine(e) for e in self._prompt.embeddings] or None,
                input_embedding_ranges=[list(r) for r in self._prompt.embedding_ranges] or None,
                gen_config=backend.generation_config(self._prompt, self._sampling, self._stops),
                sequence_start=True,
                sequence_end=True,
                step=0,
                stream_output=True,
            )
            try:
                async for output in stream:
                    status = getattr(output.status, "name", str(output.status))
                    if status not in OK_STATUSES:
                        raise ServingError(ErrorCode.INTERNAL, f"TurboMind failed the request: {status}")
                    for token_id in output.token_ids:
                        yield int(token_id)
            finally:
                await stream.aclose()  # TurboMind cancels the sequence when its stream is closed early
                try:
                    await instance.async_end(session_id)
                except Exception:  # ending a finished session is best effort
                    log.debug("async_end(%s) failed", session_id, exc_info=True)
        finally:
            backend.pool.put_nowait(instance)
            if not self.finished.done():
                self.finished.set_result(None)


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

    def engine_config(self) -> Any:
        api = self.api or load_lmdeploy_api()
        values: dict[str, Any] = {
            "tp": self.settings.tp,
            "session_len": self.settings.session_len or self.settings.context_length or self.checkpoint.context_length,
            "cache_max_entry_count": self.settings.cache_max_entry_count,
            "max_batch_size": self.instances,
            "dtype": {"float32": "auto"}.get(self.settings.dtype, self.settings.dtype),
        }
        known = {f.name for f in dataclasses.fields(api.engine_config)} if dataclasses.is_dataclass(api.engine_config) else None
        if known is None or "language_model_only" in known:
            values["language_model_only"] = True
        if known is not None:
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

    def generation_config(self, prompt: PreparedPrompt, sampling: Sampling, stops: list[int]) -> Any:
        assert self.api is not None
        return self.api.generation_config(
            max_new_tokens=prompt.max_new_tokens,
            do_sample=not sampling.greedy,
            temperature=sampling.temperature if not sampling.greedy else 1.0,
            top_p=sampling.top_p,
            top_k=sampling.top_k if not sampling.greedy else 1,
            repetition_penalty=sampling.repetition_penalty,
            random_seed=sampling.seed,
            stop_token_ids=stops,
        )

    def generate(self, prompt: PreparedPrompt, sampling: Sampling, stop_token_ids: Collection[int]) -> LMDeployGeneration:
        return LMDeployGeneration(self, prompt, sampling, sorted(int(i) for i in stop_token_ids))

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None and hasattr(engine, "close"):
            engine.close()
