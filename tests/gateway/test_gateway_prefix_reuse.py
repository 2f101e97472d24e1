"""A stateless chat through the gateway reuses the LLM's KV of earlier turns: the OpenAI API reports it as
usage.prompt_tokens_details.cached_tokens (real `openai` client), gRPC Chat in Final.usage, and the second
turn's answer is what the LLM gives without reuse (the equality itself: tests/llm/test_prefix_reuse.py)."""

from __future__ import annotations

import grpc
import openai
from gateway_helpers import data_url, new_png
from ivl_proto.common.v1 import common_pb2
from ivl_proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ivl_proto.grpc_runtime import message_size_options

GREEDY = {"temperature": 0, "max_tokens": 6}


def test_openai_usage_reports_cached_prompt_tokens_of_the_next_turn(stack):
    client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused")
    png = new_png()
    first_turn = {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                              {"type": "image_url", "image_url": {"url": data_url(png)}}]}
    first = client.chat.completions.create(model="ivl", messages=[first_turn], **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens - 256  # a new image: at
    # most the text before it (system prompt) is shared with other chats
    reply = first.choices[0].message.content
    assert reply == reply.strip()  # the reference's stripped reply, ready to be sent back
    history = [first_turn, {"role": "assistant", "content": reply or "?"}, {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="ivl", messages=history, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens - 1 <= cached < second.usage.prompt_tokens  # the image's rows included
    streamed = list(client.chat.completions.create(model="ivl", messages=history, stream=True,
                                                   stream_options={"include_usage": True}, **GREEDY))
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1  # regenerated


async def test_grpc_final_usage_carries_reuse_and_prefill_time(stack):
    png = new_png()
    async with grpc.aio.insecure_channel(stack.grpc_address, options=message_size_options()) as channel:
        stub = gateway_pb2_grpc.ChatStub(channel)
        messages = [gateway_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=[
            gateway_pb2.ContentPart(image=gateway_pb2.Image(data=png)), gateway_pb2.ContentPart(text="Describe.")])]
        finals = []
        for _ in range(2):
            request = gateway_pb2.ChatRequest(messages=messages,
                                              sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=5))
            text = ""
            async for response in stub.Chat(request):
                text += response.delta
                if response.HasField("final"):
                    finals.append(response.final)
            messages += [
                gateway_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content=[gateway_pb2.ContentPart(text=text or "?")]),
                gateway_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=[gateway_pb2.ContentPart(text="More?")]),
            ]
        assert finals[0].usage.cached_prompt_tokens < finals[0].usage.prompt_tokens - 256  # new image: not reused
        assert finals[0].usage.prefill_s > 0
        assert finals[1].usage.cached_prompt_tokens >= finals[0].usage.prompt_tokens - 1
        assert finals[1].cache_hits == 1  # the image embedding came from Redis, its KV from the LLM
