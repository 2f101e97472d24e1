"""transformers backend (CPU default, also CUDA): our own decode loop with a KV cache in a worker thread.

The prompt's '<IMG_CONTEXT>' rows of inputs_embeds are replaced by the given visual embeddings, exactly
as InternVL's all-in-one model does; sampling uses transformers' logits processors with a seeded
torch.Generator per request; cancellation is checked before every model step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ivl_llm.backends.base import BackendInfo
from ivl_llm.backends.threaded import Emit, ThreadedGeneration
from ivl_llm.checkpoint import LLMCheckpoint, build_causal_lm
from ivl_llm.prompt import ImageEmbedding, PreparedPrompt
from ivl_llm.sampling import Sampling

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def embedding_to_torch(embedding: ImageEmbedding) -> torch.Tensor:
    array = np.array(embedding.array, copy=True, order="C")  # wire buffers are read-only
    if embedding.dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def build_processors(sampling: Sampling) -> Any:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if not sampling.greedy:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k > 0:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
    return processors


class TransformersBackend:
    def __init__(self, checkpoint: LLMCheckpoint, dtype: str, device: str, max_concurrency: int, torch_threads: int = 0) -> None:
        self.checkpoint = checkpoint
        self.torch_dtype = TORCH_DTYPES[dtype]
        self.device = device
        self.torch_threads = torch_threads
        self.info = BackendInfo(name="transformers", dtype=dtype, device=device)
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="ivl-llm")
        self.model: Any = None

    async def start(self) -> None:
        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)
        self.model = await asyncio.get_running_loop().run_in_executor(
            self._executor, build_causal_lm, self.checkpoint, self.torch_dtype, self.device
        )

    async def warm_up(self, input_ids: list[int]) -> None:
        prompt = PreparedPrompt("", input_ids, [], [], 2)
        async for _ in self.generate(prompt, Sampling(max_new_tokens=2), ()):
            pass

    def generate(self, prompt: PreparedPrompt, sampling: Sampling, stop_token_ids: Collection[int]) -> ThreadedGeneration:
        stops = frozenset(int(i) for i in stop_token_ids)
        return ThreadedGeneration(
            self._executor, lambda emit, cancelled: self._decode(prompt, sampling, stops, emit, cancelled)
        )

    def prompt_embeddings(self, prompt: PreparedPrompt) -> torch.Tensor:
        ids = torch.tensor([prompt.input_ids], device=self.device)
        embeds = self.model.get_input_embeddings()(ids)
        for (start, end), embedding in zip(prompt.embedding_ranges, prompt.embeddings, strict=True):
            embeds[0, start:end] = embedding_to_torch(embedding).to(device=self.device, dtype=embeds.dtype)
        return embeds

    def _decode(
        self, prompt: PreparedPrompt, sampling: Sampling, stops: frozenset[int], emit: Emit, cancelled: threading.Event
    ) -> None:
        from transformers import DynamicCache

        processors = build_processors(sampling)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(sampling.seed))
        seen = torch.tensor([prompt.input_ids], device=self.device)
        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            out = self.model(inputs_embeds=self.prompt_embeddings(prompt), past_key_values=cache, use_cache=True, logits_to_keep=1)
            for step in range(prompt.max_new_tokens):
                if cancelled.is_set():
                    return
                scores = processors(seen, out.logits[:, -1, :].float())
                if sampling.greedy:
                    token = torch.argmax(scores, dim=-1)
                else:
                    probs = torch.softmax(scores, dim=-1)
                    token = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
                token_id = int(token.item())
                emit(token_id)
                if token_id in stops or step == prompt.max_new_tokens - 1:
                    return
                seen = torch.cat([seen, token[:, None]], dim=1)
                if cancelled.is_set():
                    return
                out = self.model(input_ids=token[:, None], past_key_values=cache, use_cache=True)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
