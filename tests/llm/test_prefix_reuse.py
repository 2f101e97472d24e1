"""Prefix KV reuse in the transformers backend: keys by token ids + image content, the bounded LRU, and the
proof that greedy (and seeded) output with reuse equals output without it, token for token: multi-turn
chats with several images whose replies go back as the stripped assistant text (what a stateless
OpenAI client sends), after eviction, for a regenerated turn and for concurrent requests on one prefix."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import torch
from ivl_llm.prefix_cache import PrefixKVCache, PromptKey, common_prefix, embedding_digest
from ivl_llm.prompt import ImageEmbedding, PreparedPrompt
from ivl_llm.sampling import Sampling
from ivl_llm.service import Finished, LLMService, Usage
from ivl_llm.templates import ChatMessage
from ivl_proto.common.v1 import common_pb2
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.llm.v1 import llm_pb2, llm_pb2_grpc
from ivl_proto.tensor_codec import tensor_to_pb
from support.llm_server import running_llm_server, server_settings

HIDDEN = 64
NEW_TOKENS = 16
QUESTIONS = ("Image-1: <image>\nImage-2: <image>\nCompare the two.", "Which is brighter?", "Why?", "Thanks. More?")


def image(rows: int, seed: int) -> ImageEmbedding:
    return ImageEmbedding(np.random.default_rng(seed).standard_normal((rows, HIDDEN)).astype(np.float32), "float32")


def prepared(ids: list[int], images: list[tuple[int, int, ImageEmbedding]] = ()) -> PreparedPrompt:
    return PreparedPrompt("", ids, [e for _, _, e in images], [(a, b) for a, b, _ in images], 4)


def kv(length: int, layers: int = 2, value: float = 0.0) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    return tuple((torch.full((1, 2, length, 8), value), torch.full((1, 2, length, 8), value)) for _ in range(layers))


# --- keys and the LRU --------------------------------------------------------------------------------

def test_image_content_not_placeholder_ids_decides_the_match():
    a, b = image(4, 1), image(4, 2)
    ids = [1, 2, 9, 9, 9, 9, 3, 4]
    first = PromptKey.of(prepared(ids, [(2, 6, a)]))
    assert common_prefix(first, PromptKey.of(prepared(ids, [(2, 6, a)]))) == 8
    assert common_prefix(first, PromptKey.of(prepared(ids, [(2, 6, b)]))) == 2  # same ids, another image
    assert common_prefix(first, PromptKey.of(prepared([1, 2, 9, 9, 7], [(2, 4, image(2, 1))]))) == 2
    assert common_prefix(first, PromptKey.of(prepared([1, 5, 9, 9, 9, 9], [(2, 6, a)]))) == 1
    bf16 = ImageEmbedding((a.array.view(np.uint32) >> 16).astype(np.uint16), "bfloat16")
    assert embedding_digest(a) != embedding_digest(bf16)  # a dtype is part of the content
    assert embedding_digest(a) == embedding_digest(ImageEmbedding(a.array.copy(), "float32"))


def test_lookup_takes_the_longest_shared_prefix_and_keeps_one_token_to_compute():
    cache = PrefixKVCache(1 << 20)
    cache.store(PromptKey.of(prepared([1, 2, 3])), kv(3, value=1.0))
    cache.store(PromptKey.of(prepared([1, 2, 4, 5, 6])), kv(5, value=2.0))
    hit = cache.lookup(PromptKey.of(prepared([1, 2, 4, 5, 6, 7])), max_length=5)
    assert hit is not None and hit.length == 5 and float(hit.layers[0][0][0, 0, 0, 0]) == 2.0
    assert cache.lookup(PromptKey.of(prepared([1, 2, 4, 5, 6])), max_length=4).length == 4
    assert cache.lookup(PromptKey.of(prepared([8, 9])), max_length=1) is None
    stats = cache.stats()
    assert (stats.entries, stats.hits, stats.misses) == (2, 2, 1)


def test_a_newer_entry_replaces_the_ones_whose_prompt_it_covers():
    cache = PrefixKVCache(1 << 20)
    cache.store(PromptKey.of(prepared([1, 2, 3, 50, 51])), kv(5), prompt_length=3)  # turn 1 + its reply
    cache.store(PromptKey.of(prepared([1, 2, 3, 50, 60, 7, 8])), kv(7), prompt_length=6)  # turn 2, retokenized
    assert cache.stats().entries == 1
    assert not cache.store(PromptKey.of(prepared([1, 2, 3, 50])), kv(4))  # already covered: not stored twice
    cache.store(PromptKey.of(prepared([1, 9])), kv(2))  # another chat
    assert cache.stats().entries == 2


def test_byte_budget_evicts_least_recently_used_and_refuses_oversized_entries():
    one = sum(k.numel() * 4 + v.numel() * 4 for k, v in kv(10))
    cache = PrefixKVCache(2 * one)
    cache.store(PromptKey.of(prepared([1] * 10)), kv(10))
    cache.store(PromptKey.of(prepared([2] * 10)), kv(10))
    assert cache.lookup(PromptKey.of(prepared([1] * 10 + [5])), 10) is not None  # [1]* is now the most recent
    cache.store(PromptKey.of(prepared([3] * 10)), kv(10))
    stats = cache.stats()
    assert (stats.entries, stats.used_bytes, stats.evictions) == (2, 2 * one, 1)
    assert cache.lookup(PromptKey.of(prepared([2] * 10 + [5])), 10) is None  # the LRU one went
    assert not cache.store(PromptKey.of(prepared([4] * 30)), kv(30))  # larger than the whole budget
    assert not PrefixKVCache(0).store(PromptKey.of(prepared([1])), kv(1))
    with pytest.raises(ValueError, match="KV holds 3 positions"):
        cache.store(PromptKey.of(prepared([1, 2])), kv(3))


# --- equality with and without reuse -----------------------------------------------------------------

@dataclass
class Turn:
    ids: list[int]
    text: str
    usage: Usage


async def run(service: LLMService, messages: list[ChatMessage], images: list[ImageEmbedding], sampling: Sampling) -> Turn:
    ids, text, usage = [], "", None
    async for event in service.generate(messages, images, sampling):
        if isinstance(event, Finished):
            usage = event.usage
        else:
            ids += event.token_ids
            text += event.text
    assert usage is not None
    return Turn(ids, text, usage)


@pytest.fixture(params=["tiny_qwen2_original", "tiny_original"], ids=["qwen2", "internlm2"])
async def pair(request) -> AsyncIterator[tuple[LLMService, LLMService]]:
    """The same checkpoint served twice: reuse on (1 MiB, a few chats) and off."""
    ckpt = request.getfixturevalue(request.param)
    services = [LLMService(server_settings(ckpt, warmup=False, prefix_cache_bytes=b, max_concurrency=2)) for b in (1 << 20, 0)]
    for service in services:
        await service.start()
    yield services[0], services[1]
    for service in services:
        await service.close()


async def chat(service: LLMService, images: list[ImageEmbedding], sampling: Sampling, turns: int) -> list[Turn]:
    messages: list[ChatMessage] = []
    out = []
    for question in QUESTIONS[:turns]:
        messages.append(ChatMessage("user", question))
        turn = await run(service, messages, images, sampling)
        messages.append(ChatMessage("assistant", turn.text or "?"))  # the stripped reply, as clients send it
        out.append(turn)
    return out


async def test_multi_turn_multi_image_chat_is_token_for_token_the_same(pair):
    reuse, fresh = pair
    images = [image(256, 1), image(512, 2)]
    with_reuse = await chat(reuse, images, Sampling(max_new_tokens=NEW_TOKENS), 4)
    without = await chat(fresh, images, Sampling(max_new_tokens=NEW_TOKENS), 4)
    assert [t.ids for t in with_reuse] == [t.ids for t in without]
    assert [t.text for t in with_reuse] == [t.text for t in without]
    assert with_reuse[0].usage.cached_prompt_tokens == 0
    for before, turn in itertools.pairwise(with_reuse):
        # everything of the previous prompt (images included) came from the cache
        assert turn.usage.cached_prompt_tokens >= before.usage.prompt_tokens
        assert turn.usage.cached_prompt_tokens < turn.usage.prompt_tokens
    assert all(t.usage.cached_prompt_tokens == 0 for t in without)
    assert all(t.usage.prefill_s > 0 for t in with_reuse + without)
    stats = reuse.backend.cache_stats()
    assert stats.entries == 1 and 0 < stats.used_bytes <= stats.budget_bytes  # one entry: the chat's latest turn


async def test_another_image_behind_the_same_placeholders_is_not_reused(pair):
    reuse, fresh = pair
    first = await run(reuse, [ChatMessage("user", QUESTIONS[0])], [image(256, 1), image(512, 2)], Sampling(max_new_tokens=4))
    assert first.usage.cached_prompt_tokens == 0
    messages = [ChatMessage("user", QUESTIONS[0])]
    swapped = [image(256, 1), image(512, 3)]
    again = await run(reuse, messages, swapped, Sampling(max_new_tokens=NEW_TOKENS))
    prompt = reuse.builder.prepare(messages, swapped, NEW_TOKENS)
    assert again.usage.cached_prompt_tokens == prompt.embedding_ranges[1][0]  # up to the changed image only
    assert again.ids == (await run(fresh, messages, swapped, Sampling(max_new_tokens=NEW_TOKENS))).ids


async def test_after_eviction_and_for_a_regenerated_turn_the_output_is_unchanged(tiny_qwen2_original):
    ckpt = tiny_qwen2_original
    small = LLMService(server_settings(ckpt, warmup=False, prefix_cache_bytes=300_000))  # about one chat
    fresh = LLMService(server_settings(ckpt, warmup=False, prefix_cache_bytes=0))
    for service in (small, fresh):
        await service.start()
    try:
        greedy = Sampling(max_new_tokens=NEW_TOKENS)
        chat_a = [ChatMessage("user", "<image>\nDescribe it.")]
        a_image, b_image = [image(256, 11)], [image(256, 12)]
        a1 = await run(small, chat_a, a_image, greedy)
        regenerated = await run(small, chat_a, a_image, greedy)
        prompt_a = small.builder.prepare(chat_a, a_image, NEW_TOKENS)
        assert regenerated.usage.cached_prompt_tokens == prompt_a.prompt_tokens - 1
        assert regenerated.ids == a1.ids
        await run(small, [ChatMessage("user", "<image>\nAnd this one?")], b_image, greedy)  # evicts chat A
        assert small.backend.cache_stats().evictions >= 1
        follow_up = [*chat_a, ChatMessage("assistant", a1.text or "?"), ChatMessage("user", "Colours?")]
        a2 = await run(small, follow_up, a_image, greedy)
        assert a2.usage.cached_prompt_tokens <= prompt_a.embedding_ranges[0][0]  # only the text before the image
        assert a1.ids == (await run(fresh, chat_a, a_image, greedy)).ids
        assert a2.ids == (await run(fresh, follow_up, a_image, greedy)).ids
    finally:
        for service in (small, fresh):
            await service.close()


async def test_seeded_sampling_and_concurrent_requests_on_one_prefix(pair):
    reuse, fresh = pair
    images = [image(256, 5), image(512, 6)]
    first = [ChatMessage("user", QUESTIONS[0])]
    warm = await run(reuse, first, images, Sampling(max_new_tokens=NEW_TOKENS))
    follow_up = [*first, ChatMessage("assistant", warm.text or "?"), ChatMessage("user", QUESTIONS[1])]
    seeded = Sampling(max_new_tokens=NEW_TOKENS, temperature=0.9, top_p=0.9, seed=7)
    together = await asyncio.gather(
        run(reuse, follow_up, images, seeded), run(reuse, follow_up, images, Sampling(max_new_tokens=NEW_TOKENS))
    )
    assert all(t.usage.cached_prompt_tokens > 0 for t in together)
    assert together[0].ids == (await run(fresh, follow_up, images, seeded)).ids
    assert together[1].ids == (await run(fresh, follow_up, images, Sampling(max_new_tokens=NEW_TOKENS))).ids


# --- through gRPC: usage and Info ----------------------------------------------------------------------

async def test_grpc_final_usage_and_info_tell_the_reuse(tiny_qwen2_original):
    async with (
        running_llm_server(tiny_qwen2_original, prefix_cache_bytes=1 << 20) as (address, _),
        grpc.aio.insecure_channel(address, options=message_size_options()) as channel,
    ):
        stub = llm_pb2_grpc.LanguageModelStub(channel)
        embedding = tensor_to_pb(image(256, 9).array)
        messages = [llm_pb2.Message(role=common_pb2.ROLE_USER, content="<image>\nWhat is it?")]
        finals = []
        for _ in range(2):
            request = llm_pb2.GenerateRequest(
                messages=messages, image_embeddings=[embedding], sampling=common_pb2.SamplingParams(max_new_tokens=6)
            )
            text = ""
            async for response in stub.Generate(request):
                if response.HasField("final"):
                    finals.append(response.final)
                text += response.delta.text
            messages += [
                llm_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=text or "?"),
                llm_pb2.Message(role=common_pb2.ROLE_USER, content="More?"),
            ]
        assert finals[0].usage.cached_prompt_tokens == 0
        assert finals[1].usage.cached_prompt_tokens > finals[0].usage.prompt_tokens - 1
        assert finals[1].usage.prefill_s > 0
        info = await stub.Info(llm_pb2.InfoRequest())
        assert info.prefix_cache_budget_bytes == 1 << 20
        assert info.prefix_cache_entries == 1 and 0 < info.prefix_cache_used_bytes <= 1 << 20
        assert info.system_message_source == "internvl2 default"
