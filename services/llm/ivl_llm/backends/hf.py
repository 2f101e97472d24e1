"""transformers backend (CPU default, also CUDA): our own decode loop with a KV cache in a worker thread.

The prompt's '<IMG_CONTEXT>' rows of inputs_embeds are replaced by the given visual embeddings, exactly
as InternVL's all-in-one model does; sampling uses transformers' logits processors with a seeded
torch.Generator per request; cancellation is checked before every model step.

Prefix reuse (ivl_llm.prefix_cache): before the prefill, the longest stored prefix of the prompt (token
ids + image digests) is copied into the request's cache and only the rest of the prompt is computed;
after the generation, the KV of everything fed (prompt + generated tokens) is stored for later turns.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from ivl_proto.dtypes import to_torch, torch_dtype

from ivl_llm.backends.base import BackendInfo, MatcherFactory, PrefillStats, TokenOut
from ivl_llm.backends.threaded import Control, Emit, Report, ThreadedGeneration
from ivl_llm.checkpoint import LLMCheckpoint, build_causal_lm
from ivl_llm.logits import build_pipeline
from ivl_llm.prefix_cache import PrefixCacheStats, PrefixKVCache, PromptKey
from ivl_llm.prompt import ImageEmbedding, PreparedPrompt
from ivl_llm.sampling import Sampling

log = logging.getLogger(__name__)

def embedding_to_torch(embedding: ImageEmbedding) -> torch.Tensor:
    """A torch view of the embedding's (read-only) wire bytes, no copy: it is only read, once, when its rows are
    written into the prompt's input embeddings (the one conversion of this hop)."""
    return to_torch(embedding.array, embedding.dtype)


def reuse_blocker(model: Any) -> str | None:
    """Why stored KV of a prefix would not equal a fresh prefill's in this model, or None."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if any(type(layer) is not DynamicLayer for layer in DynamicCache(config=model.config).layers):
        return "sliding-window attention layers keep only the last window"
    rope = getattr(model.config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and "dynamic" in str(rope.get("rope_type", rope.get("type", ""))):
        return "dynamic NTK RoPE scaling changes every position's rotation with the sequence length"
    return None


class TransformersBackend:
    def __init__(
        self,
        checkpoint: LLMCheckpoint,
        dtype: str,
        device: str,
        max_concurrency: int,
        torch_threads: int = 0,
        prefix_cache_bytes: int = 0,
    ) -> None:
        self.checkpoint = checkpoint
        self.torch_dtype = torch_dtype(dtype, "IVL_LLM_DTYPE")
        self.device = device
        self.torch_threads = torch_threads
        self.info = BackendInfo(name="transformers", dtype=dtype, device=device)
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="ivl-llm")
        self.model: Any = None
        # One cache per loaded model: KV is never shared across checkpoints, dtypes or devices.
        self.prefix_cache = PrefixKVCache(prefix_cache_bytes)

    async def start(self) -> None:
        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)
        self.model = await asyncio.get_running_loop().run_in_executor(
            self._executor, build_causal_lm, self.checkpoint, self.torch_dtype, self.device
        )
        blocker = reuse_blocker(self.model) if self.prefix_cache.enabled else None
        if blocker is not None:
            log.warning("prefix KV reuse is off for %s: %s", self.checkpoint.model_id, blocker)
            self.prefix_cache = PrefixKVCache(0)

    async def warm_up(self, input_ids: list[int]) -> None:
        prompt = PreparedPrompt("", input_ids, [], [], 2)
        async for _ in self.generate(prompt, Sampling(max_new_tokens=2), (), None, reuse=False):
            pass

    def cache_stats(self) -> PrefixCacheStats:
        return self.prefix_cache.stats()

    def generate(
        self, prompt: PreparedPrompt, sampling: Sampling, stop_token_ids: Collection[int],
        matchers: MatcherFactory | None = None, reuse: bool = True,
    ) -> ThreadedGeneration:
        stops = frozenset(int(i) for i in stop_token_ids)
        cache = self.prefix_cache if reuse else PrefixKVCache(0)
        return ThreadedGeneration(
            self._executor,
            lambda emit, control, report: self._decode(prompt, sampling, stops, cache, matchers, emit, control, report),
        )

    def prompt_embeddings(self, prompt: PreparedPrompt) -> torch.Tensor:
        ids = torch.tensor([prompt.input_ids], device=self.device)
        embeds = self.model.get_input_embeddings()(ids)
        for (start, end), embedding in zip(prompt.embedding_ranges, prompt.embeddings, strict=True):
            embeds[0, start:end] = embedding_to_torch(embedding).to(device=self.device, dtype=embeds.dtype)
        return embeds

    def _prefill(self, prompt: PreparedPrompt, key: PromptKey | None, store: PrefixKVCache) -> tuple[Any, Any, int]:
        """(model output with the last prompt position's logits, the request's cache, reused tokens)."""
        from transformers import DynamicCache

        hit = store.lookup(key, len(prompt.input_ids) - 1) if key is not None else None
        if hit is None:
            cache = DynamicCache(config=self.model.config)
            reused = 0
        else:
            reused = hit.length
            prefix = [(k[..., :reused, :], v[..., :reused, :]) for k, v in hit.layers]
            cache = DynamicCache(ddp_cache_data=prefix, config=self.model.config)  # a copy: entries stay unchanged
        embeds = self.prompt_embeddings(prompt)[:, reused:]
        out = self.model(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out, cache, reused

    def _decode(
        self,
        prompt: PreparedPrompt,
        sampling: Sampling,
        stops: frozenset[int],
        store: PrefixKVCache,
        make_matchers: MatcherFactory | None,
        emit: Emit,
        control: Control,
        report: Report,
    ) -> None:
        """`sampling.n` choices from one prefill: the prompt's KV is computed once (or reused from the prefix
        cache), then repeated along the batch dimension, and every step decodes all choices in one forward."""
        n = sampling.n
        prompt_length = len(prompt.input_ids)
        pipeline = build_pipeline(sampling, prompt_length, stops, self.device)
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(sampling.seed))
        seen = torch.tensor([prompt.input_ids] * n, device=self.device)
        key = PromptKey.of(prompt) if store.enabled else None
        matchers = make_matchers(n) if make_matchers is not None else None
        top_k = sampling.top_logprobs
        fed: list[int] = []  # generated tokens of choice 0 whose KV is in the cache (n == 1 only)
        done = [False] * n
        with torch.inference_mode():
            started = time.perf_counter()
            out, cache, reused = self._prefill(prompt, key, store)
            prompt_layers = tuple((layer.keys, layer.values) for layer in cache.layers)
            if n > 1:
                cache.batch_repeat_interleave(n)  # new tensors: prompt_layers keep the single prompt's KV
            logits = out.logits[:, -1, :].float().expand(n, -1)
            try:
                for step in range(prompt.max_new_tokens):
                    for index in control.stopped:
                        done[index] = True
                    active = [i for i in range(n) if not done[i]]
                    if control.cancelled.is_set() or not active:
                        return
                    raw = logits.clone() if (sampling.logprobs or not pipeline.empty or matchers) else logits
                    logprobs = torch.log_softmax(logits, dim=-1) if sampling.logprobs else None
                    scores = pipeline.penalties(seen, raw)
                    if matchers is not None:
                        matchers.mask(scores, active)
                    scores = pipeline.warpers(seen, scores)
                    if sampling.greedy:
                        tokens = torch.argmax(scores, dim=-1)
                    else:
                        probs = torch.softmax(scores, dim=-1)
                        tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
                    if step == 0:
                        report(PrefillStats(prompt_length, reused, time.perf_counter() - started))
                    ids = tokens.tolist()
                    top = logprobs.topk(top_k, dim=-1) if logprobs is not None and top_k else None
                    for index in active:
                        token_id = int(ids[index])
                        if matchers is not None:
                            matchers.accept(index, token_id)
                        emit(self._token_out(token_id, index, logprobs, top))
                        if token_id in stops:
                            done[index] = True
                    if all(done) or step == prompt.max_new_tokens - 1:
                        return
                    seen = torch.cat([seen, tokens[:, None]], dim=1)
                    if control.cancelled.is_set():
                        return
                    out = self.model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True)
                    logits = out.logits[:, -1, :].float()
                    fed.append(int(ids[0]))
            except BaseException:
                key = None  # a failed step may have left the layers at different lengths: keep nothing
                raise
            finally:
                if key is not None and n == 1:
                    layers = tuple((layer.keys, layer.values) for layer in cache.layers)
                    store.store(key.extended(fed), layers, prompt_length=len(key))
                elif key is not None:  # several choices: the next turn continues one of them; keep the prompt
                    store.store(key, prompt_layers, prompt_length=len(key))

    @staticmethod
    def _token_out(token_id: int, index: int, logprobs: torch.Tensor | None, top: Any) -> TokenOut:
        if logprobs is None:
            return TokenOut(token_id, index)
        alternatives: tuple[tuple[int, float], ...] = ()
        if top is not None:
            alternatives = tuple(zip(top.indices[index].tolist(), top.values[index].tolist(), strict=True))
        return TokenOut(token_id, index, float(logprobs[index, token_id]), alternatives)

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
