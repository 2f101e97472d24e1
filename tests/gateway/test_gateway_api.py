"""The gateway's APIs against the real stack: the openai client, gRPC Chat, health/ready/metrics, limits, auth."""

from __future__ import annotations

import json

import grpc
import httpx
import openai
import pytest
from gateway_helpers import data_url, metric, new_png
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ivl_proto.common.v1 import common_pb2
from ivl_proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ivl_proto.grpc_runtime import message_size_options

GREEDY = {"temperature": 0, "max_tokens": 6}


def user_turn(text: str, *pngs: bytes) -> dict:
    return {
        "role": "user",
        "content": [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pngs],
    }


def grpc_request(text: str, *pngs: bytes, max_new_tokens: int = 6, **tiling) -> gateway_pb2.ChatRequest:
    content = [gateway_pb2.ContentPart(image=gateway_pb2.Image(data=p)) for p in pngs]
    content.append(gateway_pb2.ContentPart(text=text))
    return gateway_pb2.ChatRequest(
        messages=[gateway_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=content)],
        sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=max_new_tokens),
        tiling=common_pb2.TilingOptions(**tiling),
    )


def test_openai_client_non_stream_then_cache_hit(stack):
    client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused")
    png = new_png()
    first = client.chat.completions.create(model="ivl", messages=[user_turn("What is this?", png)], **GREEDY)
    assert first.object == "chat.completion" and first.choices[0].finish_reason in ("stop", "length")
    assert isinstance(first.choices[0].message.content, str) and first.usage.completion_tokens >= 1
    assert first.usage.prompt_tokens > 256  # the image's tokens are in the prompt
    extra = first.model_extra["ivl"]
    assert extra["cache_hits"] == 0 and extra["images"][0]["cache_hit"] is False
    assert extra["images"][0]["plan"]["num_tiles"] >= 1
    second = client.chat.completions.create(model="ivl", messages=[user_turn("What is this?", png)], **GREEDY)
    assert second.model_extra["ivl"]["cache_hits"] == 1
    assert second.choices[0].message.content == first.choices[0].message.content  # greedy, same embeddings


def test_openai_client_streaming(stack):
    client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="ivl", messages=[user_turn("Describe it.", new_png())], stream=True,
        stream_options={"include_usage": True}, **GREEDY,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes and finishes[-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    non_stream = client.chat.completions.create(model="ivl", messages=[user_turn("Describe it.", new_png())], **GREEDY)
    assert isinstance(text, str) and isinstance(non_stream.choices[0].message.content, str)
    raw = httpx.post(stack.http_url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3})
    lines = [line for line in raw.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and raw.headers["content-type"].startswith("text/event-stream")


def test_models_health_ready_metrics(stack):
    client = openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["ckpt", "ivl"]  # the served name, then the alias
    assert httpx.get(stack.http_url + "/health").json() == {"status": "ok"}
    ready = httpx.get(stack.http_url + "/ready", timeout=30)
    assert ready.status_code == 200 and ready.json()["compatible"] is True and ready.json()["redis"] == "ok"
    client.chat.completions.create(model="ivl", messages=[user_turn("x", new_png())], **GREEDY)
    text = httpx.get(stack.http_url + "/metrics").text
    for name in ("vision_cache_hits_total", "vision_cache_misses_total", "vision_cache_errors_total",
                 "gateway_requests_total", "gateway_time_to_first_token_seconds_bucket",
                 "vision_encode_seconds_bucket", "vision_tiles_per_image_bucket",
                 "gateway_decode_tokens_per_second_bucket"):
        assert name in text, name
    assert metric(stack.gateway, "vision_cache_misses_total") >= 1


async def test_grpc_chat_info_plan_health_reflection(stack):
    png = new_png(900, 300)
    async with grpc.aio.insecure_channel(stack.grpc_address, options=message_size_options()) as channel:
        stub = gateway_pb2_grpc.ChatStub(channel)
        events = [e async for e in stub.Chat(grpc_request("What is in the picture?", png, max_tiles=3))]
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "image" and kinds[-1] == "final" and kinds.count("final") == 1
        image = events[0].image
        assert not image.cache_hit and image.plan.grid_cols * image.plan.grid_rows <= 3 and image.plan.max_tiles == 3
        final = events[-1].final
        assert final.images == 1 and final.cache_hits == 0 and final.usage.completion_tokens >= 1
        assert final.usage.time_to_first_token_s > 0 and final.usage.total_s >= final.usage.time_to_first_token_s
        again = [e async for e in stub.Chat(grpc_request("And now?", png, max_tiles=3))]
        assert again[0].image.cache_hit and again[-1].final.cache_hits == 1

        info = await stub.Info(gateway_pb2.InfoRequest())
        assert info.hidden_size > 0 and info.vision_fingerprint and info.max_tiles_limit == 40
        assert info.default_tiling.max_tiles == 2  # the gateway's configured default
        assert info.tiny_random_model  # from the LLM service's Info.random_weights (the checkpoint's marker)
        plans = await stub.PlanImages(gateway_pb2.PlanImagesRequest(images=[gateway_pb2.Image(data=png)],
                                                                   tiling=common_pb2.TilingOptions(max_tiles=6)))
        assert plans.plans[0].original_width == 900 and plans.tokens_per_tile == 256

        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert "ivl.gateway.v1.Chat" in names


@pytest.mark.parametrize(
    ("make_body", "status", "needle"),
    [
        (lambda: {"messages": [user_turn("x", *[new_png(64, 64) for _ in range(7)])]}, 400, "limit is 6 images"),
        (lambda: {"messages": [user_turn("x", new_png(2500, 2000))]}, 413, "limit is 4.0 MP"),
        (lambda: {"messages": [user_turn("x", *[new_png(1800, 200) for _ in range(5)])], "max_tiles": 40},
         400, "limit is 40 tiles per request"),
        (lambda: {"messages": [user_turn("x", new_png(2600, 1300))], "max_tiles": 40, "use_thumbnail": True},
         400, "context is 8192 tokens"),
        (lambda: {"messages": [user_turn("x", new_png())], "max_tiles": 41}, 400, "between 1 and 40"),
        (lambda: {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64,aGVsbG8="}}]}]}, 400, "image 0"),
        (lambda: {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "https://example.com/cat.png"}}]}]}, 400, "disabled"),
        (lambda: {"messages": [{"role": "user", "content": "x" * (4 * 2**20)}]}, 413, "limit is 3.0 MiB"),
        (lambda: {"messages": "oops"}, 400, "messages"),
    ],
)
def test_limits_give_clear_errors(stack, make_body, status, needle):
    response = httpx.post(stack.http_url + "/v1/chat/completions", json={"max_tokens": 2, **make_body()}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] and error["code"]


def test_streaming_request_errors_before_the_first_token_get_a_real_status(stack):
    response = httpx.post(stack.http_url + "/v1/chat/completions", timeout=60, json={
        "messages": [user_turn("x", new_png())], "max_tiles": 41, "stream": True})
    assert response.status_code == 400 and "between 1 and 40" in response.json()["error"]["message"]


async def test_grpc_limits_are_invalid_argument(stack):
    async with grpc.aio.insecure_channel(stack.grpc_address, options=message_size_options()) as channel:
        stub = gateway_pb2_grpc.ChatStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [e async for e in stub.Chat(grpc_request("x", new_png(), max_tiles=0))]
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "between 1 and 40" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:  # grpc's own receive limit (= max_request_bytes)
            _ = [e async for e in stub.Chat(grpc_request("x" * (4 * 2**20)))]
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in info.value.details() and f"vs. {3 * 2**20})" in info.value.details()


async def test_api_keys_on_http_and_grpc(stack):
    with stack.extra_gateway(api_keys=["s3cret"]) as gateway:
        base = f"http://127.0.0.1:{gateway.ports.http}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong").models.list()
        assert openai.OpenAI(base_url=base, api_key="s3cret").models.list().data
        assert httpx.get(f"http://127.0.0.1:{gateway.ports.http}/health").status_code == 200  # liveness stays open
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.ports.grpc}") as channel:
            stub = gateway_pb2_grpc.ChatStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Info(gateway_pb2.InfoRequest())
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
            reply = await stub.Info(gateway_pb2.InfoRequest(), metadata=(("authorization", "Bearer s3cret"),))
            assert reply.hidden_size > 0


@pytest.mark.parametrize("form", ["dns:localhost:{port}", "dns:///localhost:{port}", "localhost:{port}"])
def test_dns_named_replicas(stack, form):
    port = stack.vision_addresses[0].rsplit(":", 1)[1]
    with stack.extra_gateway(vision_addresses=[form.format(port=port)]) as gateway:
        replicas = gateway.chat_service.vision.replicas
        assert f"127.0.0.1:{port}" in replicas.addresses
        assert replicas.target == f"dns:///localhost:{port}"  # grpc's own resolver balances over the name
        response = httpx.post(f"http://127.0.0.1:{gateway.ports.http}/v1/chat/completions", timeout=60, json={
            "messages": [user_turn("x", new_png())], "max_tokens": 2})
        assert response.status_code == 200, response.text
        ready = httpx.get(f"http://127.0.0.1:{gateway.ports.http}/ready", timeout=30).json()
        assert "fingerprint=" in ready["vision"]["replicas"][f"127.0.0.1:{port}"]


async def test_grpc_chat_choices_logprobs_guided_and_per_image_tiling(stack):
    """The gRPC API takes the new SamplingParams and per-image tiling; deltas carry their choice and logprobs."""
    png = new_png(900, 300)
    sampling = common_pb2.SamplingParams(temperature=1.0, seed=2, max_new_tokens=4, n=2, logprobs=True, top_logprobs=2)
    request = gateway_pb2.ChatRequest(
        messages=[gateway_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=[
            gateway_pb2.ContentPart(image=gateway_pb2.Image(data=png, tiling=common_pb2.TilingOptions(max_tiles=1))),
            gateway_pb2.ContentPart(text="What is it?")])],
        sampling=sampling)
    async with grpc.aio.insecure_channel(stack.grpc_address, options=message_size_options()) as channel:
        stub = gateway_pb2_grpc.ChatStub(channel)
        events = [e async for e in stub.Chat(request)]
        image = next(e.image for e in events if e.WhichOneof("event") == "image")
        assert image.plan.num_tiles == 1 and image.plan.max_tiles == 1  # the image's own options won
        deltas = [e for e in events if e.WhichOneof("event") == "delta"]
        assert {d.choice_index for d in deltas} == {0, 1}
        assert all(len(entry.top) == 2 for d in deltas for entry in d.logprobs)
        final = events[-1].final
        assert len(final.choice_finish_reasons) == 2 and final.usage.completion_tokens == 8
        guided = gateway_pb2.ChatRequest(
            messages=[gateway_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=[gateway_pb2.ContentPart(text="JSON")])],
            sampling=common_pb2.SamplingParams(max_new_tokens=150, guided=common_pb2.GuidedDecoding(json_object=True)))
        text = "".join(e.delta for e in [e async for e in stub.Chat(guided)] if e.WhichOneof("event") == "delta")
        assert isinstance(json.loads(text), dict)
