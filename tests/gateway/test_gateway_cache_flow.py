"""The embedding cache seen end to end, counted by the vision service itself (Info.batching.requests)."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import openai
from gateway_helpers import data_url, metric, new_png, vision_images_seen
from ivl_proto.common.v1 import common_pb2
from ivl_proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ivl_proto.grpc_runtime import message_size_options
from support.stack import running_stack

USER, ASSISTANT = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT


def image_part(png: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png)}}


def test_five_turn_chat_encodes_each_image_once(stack):
    client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused")
    first, later = new_png(700, 300), new_png(300, 600)
    new_images = {1: [first], 3: [later]}
    before = vision_images_seen(stack.vision_addresses[0])
    history: list[dict] = []
    hits_per_turn = []
    for turn in range(1, 6):
        parts = [image_part(p) for p in new_images.get(turn, [])] + [{"type": "text", "text": f"question {turn}"}]
        history.append({"role": "user", "content": parts})
        reply = client.chat.completions.create(model="ivl", messages=history, temperature=0, max_tokens=3)
        history.append({"role": "assistant", "content": reply.choices[0].message.content or "ok"})
        extra = reply.model_extra["ivl"]
        hits_per_turn.append([image["cache_hit"] for image in extra["images"]])
    assert hits_per_turn == [[False], [True], [True, False], [True, True], [True, True]]
    assert vision_images_seen(stack.vision_addresses[0]) - before == 2  # each image encoded exactly once


async def test_concurrent_requests_with_the_same_new_image_encode_once(stack):
    png = new_png(640, 480)
    before = vision_images_seen(stack.vision_addresses[0])
    waits_before = metric(stack.gateway, "vision_cache_singleflight_waits_total")
    request = gateway_pb2.ChatRequest(
        messages=[gateway_pb2.ChatMessage(role=USER, content=[
            gateway_pb2.ContentPart(image=gateway_pb2.Image(data=png)), gateway_pb2.ContentPart(text="same?")])],
        sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=2),
    )
    async with grpc.aio.insecure_channel(stack.grpc_address, options=message_size_options()) as channel:
        stub = gateway_pb2_grpc.ChatStub(channel)

        async def one() -> list[gateway_pb2.ChatResponse]:
            return [event async for event in stub.Chat(request)]

        results = await asyncio.gather(*(one() for _ in range(5)))
    assert all(r[-1].WhichOneof("event") == "final" for r in results)
    assert vision_images_seen(stack.vision_addresses[0]) - before == 1
    assert metric(stack.gateway, "vision_cache_singleflight_waits_total") - waits_before >= 1


def test_redis_down_chats_still_work_then_caching_resumes(stack, caplog):
    client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused")
    errors_before = sum(metric(stack.gateway, "vision_cache_errors_total", kind=k) for k in ("get", "put"))
    stack.redis.stop()
    try:
        png = new_png()
        for _ in range(2):  # uncached: both succeed, neither is a hit
            reply = client.chat.completions.create(
                model="ivl", messages=[{"role": "user", "content": [image_part(png), {"type": "text", "text": "hi"}]}],
                max_tokens=2,
            )
            assert reply.model_extra["ivl"]["cache_hits"] == 0
        assert httpx.get(stack.http_url + "/ready", timeout=30).json()["redis"].startswith("down")
        errors = sum(metric(stack.gateway, "vision_cache_errors_total", kind=k) for k in ("get", "put"))
        assert errors > errors_before
    finally:
        stack.redis.start()
    png = new_png()
    message = [{"role": "user", "content": [image_part(png), {"type": "text", "text": "hi"}]}]
    deadline = time.monotonic() + 10
    while True:  # caching resumes by itself once the retry interval has passed
        client.chat.completions.create(model="ivl", messages=message, max_tokens=2)
        if client.chat.completions.create(model="ivl", messages=message, max_tokens=2).model_extra["ivl"]["cache_hits"]:
            break
        assert time.monotonic() < deadline, "caching did not resume after Redis came back"
        time.sleep(0.3)


def test_gateway_without_redis_serves_uncached(stack):
    with stack.extra_gateway(redis_url="") as gateway:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.ports.http}/v1", api_key="unused")
        png = new_png()
        message = [{"role": "user", "content": [image_part(png), {"type": "text", "text": "hi"}]}]
        replies = [client.chat.completions.create(model="ivl", messages=message, max_tokens=2) for _ in range(2)]
        assert [r.model_extra["ivl"]["cache_hits"] for r in replies] == [0, 0]
        assert httpx.get(f"http://127.0.0.1:{gateway.ports.http}/ready", timeout=30).json()["redis"] == "disabled"


def test_two_vision_replicas_share_one_cache(tiny_original):
    with running_stack(tiny_original, vision_replicas=2, gateway={"default_max_tiles": 1, "model_aliases": ["ivl"]}) as stack:
        client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused")
        images = [new_png(300 + 10 * i, 200) for i in range(4)]
        before = [vision_images_seen(a) for a in stack.vision_addresses]

        def ask(png: bytes) -> bool:
            reply = client.chat.completions.create(
                model="ivl", messages=[{"role": "user", "content": [image_part(png), {"type": "text", "text": "?"}]}],
                max_tokens=1,
            )
            return reply.model_extra["ivl"]["images"][0]["cache_hit"]

        assert [ask(p) for p in images] == [False] * 4
        spread = [vision_images_seen(a) - b for a, b in zip(stack.vision_addresses, before, strict=True)]
        assert sum(spread) == 4 and all(n >= 1 for n in spread), spread  # new images went to both replicas
        assert [ask(p) for p in images] == [True] * 4  # whichever replica is next, a hit
        after = [vision_images_seen(a) - b for a, b in zip(stack.vision_addresses, before, strict=True)]
        assert after == spread
        stack.stop_vision(0)  # an unhealthy replica is skipped: new images still get encoded
        assert [ask(new_png(200, 200 + i)) for i in range(3)] == [False] * 3
        assert vision_images_seen(stack.vision_addresses[1]) - before[1] == spread[1] + 3
