"""The real LLM gRPC service on loopback over a real tiny checkpoint: streaming, checks, limits, cancel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ivl_llm.server import LLMServer
from ivl_proto.common.v1 import common_pb2
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.llm.v1 import llm_pb2, llm_pb2_grpc
from ivl_proto.tensor_codec import tensor_to_pb
from support.llm_server import llm_server_in_thread

HIDDEN = 64
CONTEXT = 1024
USER, ASSISTANT = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT


@pytest.fixture(scope="module")
def llm_server(tiny_original) -> Iterator[tuple[str, LLMServer]]:
    with llm_server_in_thread(tiny_original, max_concurrency=1, max_queue=1, context_length=CONTEXT) as running:
        yield running


@pytest.fixture
def stub(llm_server) -> Iterator[llm_pb2_grpc.LanguageModelStub]:
    channel = grpc.insecure_channel(llm_server[0], options=message_size_options())
    yield llm_pb2_grpc.LanguageModelStub(channel)
    channel.close()


def embedding(rows: int = 256, width: int = HIDDEN, value: float = 0.25, dtype: str = "float32") -> common_pb2.Tensor:
    array = np.full((rows, width), value, dtype=np.float32)
    if dtype == "bfloat16":
        return tensor_to_pb((array.view(np.uint32) >> 16).astype(np.uint16), "bfloat16")
    return tensor_to_pb(array.astype(dtype), dtype)


def request(text: str = "<image>\nDescribe the image.", embeddings=None, **sampling) -> llm_pb2.GenerateRequest:
    sampling.setdefault("max_new_tokens", 12)
    return llm_pb2.GenerateRequest(
        messages=[llm_pb2.Message(role=USER, content=text)],
        image_embeddings=[embedding()] if embeddings is None else embeddings,
        sampling=common_pb2.SamplingParams(**sampling),
    )


def collect(stub, req) -> tuple[str, list[llm_pb2.Delta], llm_pb2.Final]:
    deltas, finals = [], []
    for response in stub.Generate(req, timeout=60):
        (finals if response.HasField("final") else deltas).append(getattr(response, response.WhichOneof("event")))
    assert len(finals) == 1
    return "".join(d.text for d in deltas), deltas, finals[0]


def wait_until(predicate, timeout_s: float = 10.0) -> float:
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout_s:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)
    return time.perf_counter() - start


def test_health_reflection_and_info(llm_server, stub):
    channel = grpc.insecure_channel(llm_server[0])
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="ivl.llm.v1.LanguageModel"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert {"ivl.llm.v1.LanguageModel", "grpc.health.v1.Health"} <= names
    channel.close()
    info = stub.Info(llm_pb2.InfoRequest())
    assert (info.template, info.context_length, info.hidden_size) == ("internlm2-chat", CONTEXT, HIDDEN)
    assert (info.backend, info.dtype, info.device) == ("transformers", "float32", "cpu")
    assert (info.max_concurrency, info.max_queue) == (1, 1)
    assert info.model_id == "ckpt"
    assert info.random_weights  # the tiny writer marks its checkpoints; the UI shows a banner for them


def test_generate_streams_deltas_then_one_final_with_usage(stub):
    text, deltas, final = collect(stub, request(max_new_tokens=12))
    assert text and len(deltas) >= 2
    assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == 12 == sum(d.tokens for d in deltas)
    assert final.usage.prompt_tokens > 256
    assert final.usage.time_to_first_token_s > 0 and final.usage.decode_tokens_per_s > 0
    assert final.usage.total_s >= final.usage.time_to_first_token_s
    again, _, _ = collect(stub, request(max_new_tokens=12))
    assert again == text  # greedy is deterministic


def test_seeded_sampling_repeats_and_seeds_differ(stub):
    runs = {seed: collect(stub, request(temperature=1.0, top_p=0.95, top_k=50, seed=seed, max_new_tokens=16))[0] for seed in (1, 2)}
    assert collect(stub, request(temperature=1.0, top_p=0.95, top_k=50, seed=1, max_new_tokens=16))[0] == runs[1]
    assert runs[1] != runs[2]
    greedy, _, _ = collect(stub, request(repetition_penalty=1.3, max_new_tokens=16))
    assert greedy != collect(stub, request(max_new_tokens=16))[0]


def test_stop_strings_cut_the_output(stub):
    full, _, _ = collect(stub, request(max_new_tokens=24))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    text, _, final = collect(stub, request(max_new_tokens=24, stop=[stop]))
    assert text == full[: full.find(stop)].strip()  # the reference strips the reply it returns
    assert final.finish_reason == common_pb2.FINISH_REASON_STOP


def test_bfloat16_embeddings_equal_float32_for_representable_values(stub):
    f32, _, _ = collect(stub, request(embeddings=[embedding(value=0.5)]))
    bf16, _, _ = collect(stub, request(embeddings=[embedding(value=0.5, dtype="bfloat16")]))
    f16, _, _ = collect(stub, request(embeddings=[embedding(value=0.5, dtype="float16")]))
    assert f32 == bf16 == f16


def test_multi_turn_multi_image_request_runs(stub):
    req = llm_pb2.GenerateRequest(
        messages=[
            llm_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
            llm_pb2.Message(role=USER, content="Image-1: <image>\nImage-2: <image>\nCompare."),
            llm_pb2.Message(role=ASSISTANT, content="They differ."),
            llm_pb2.Message(role=USER, content="<image>\nAnd this?"),
        ],
        image_embeddings=[embedding(64), embedding(128, value=0.1), embedding(64, value=-0.2)],
        sampling=common_pb2.SamplingParams(max_new_tokens=4),
    )
    _, _, final = collect(stub, req)
    assert final.usage.prompt_tokens > 256 and final.usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("req", "needle"),
    [
        (request(text="<image>\n<image>\nTwo?"), "2 '<image>' placeholder(s) but 1 image embedding(s)"),
        (request(embeddings=[embedding(width=32)]), "32 wide but the LLM's hidden size is 64"),
        (request(max_new_tokens=900), "> the context length 1024"),
        (request(max_new_tokens=0), "max_new_tokens (OpenAI max_tokens) is 0"),
        (request(temperature=-1), "temperature is -1"),
        (request(top_p=1.5), "top_p is 1.5"),
        (
            request(embeddings=[common_pb2.Tensor(dtype="float32", shape=[256, 64], data=b"\0" * 10)]),
            "needs 65536 bytes, got 10",
        ),
        (request(embeddings=[common_pb2.Tensor(dtype="int8", shape=[1, 64], data=b"\0" * 64)]), "dtype 'int8'"),
        (llm_pb2.GenerateRequest(messages=[llm_pb2.Message(content="hi")]), "has no role"),
        (llm_pb2.GenerateRequest(), "conversation is empty"),
    ],
)
def test_bad_requests_are_invalid_argument_with_the_numbers(stub, req, needle):
    with pytest.raises(grpc.RpcError) as caught:
        collect(stub, req)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in caught.value.details()


def test_full_queue_is_resource_exhausted_and_cancel_gives_the_slot_back(llm_server, stub):
    scheduler = llm_server[1].service.scheduler
    long = request(max_new_tokens=600)
    first = stub.Generate(long, timeout=120)
    assert next(first).HasField("delta")  # generating: the only slot is taken
    second = stub.Generate(long, timeout=120)
    wait_until(lambda: scheduler.waiting == 1)
    with pytest.raises(grpc.RpcError) as caught:
        collect(stub, request())
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue limit 1" in caught.value.details()
    first.cancel()
    assert next(second).HasField("delta")  # the freed slot went to the waiting call
    second.cancel()
    took = wait_until(lambda: scheduler.active == 0 and scheduler.waiting == 0, timeout_s=5)
    assert took < 2.0
    _, _, final = collect(stub, request(max_new_tokens=2))
    assert final.usage.completion_tokens == 2


def test_a_client_that_goes_away_frees_its_slot(llm_server):
    scheduler = llm_server[1].service.scheduler
    channel = grpc.insecure_channel(llm_server[0], options=message_size_options())
    stream = llm_pb2_grpc.LanguageModelStub(channel).Generate(request(max_new_tokens=600), timeout=120)
    assert next(stream).HasField("delta")
    assert scheduler.active == 1
    channel.close()
    wait_until(lambda: scheduler.active == 0, timeout_s=5)


async def test_health_is_not_serving_until_loaded_then_graceful_stop(tiny_original):
    from ivl_llm.backends.hf import TransformersBackend
    from ivl_llm.service import LLMService
    from support.llm_server import running_llm_server, server_settings

    release = asyncio.Event()

    class HeldBackend(TransformersBackend):
        async def start(self) -> None:
            await release.wait()
            await super().start()

    settings = server_settings(tiny_original)
    service = LLMService(settings)
    service.backend = HeldBackend(service.checkpoint, "float32", "cpu", 1)
    async with (
        running_llm_server(tiny_original, service=service, wait_ready=False) as (address, server),
        grpc.aio.insecure_channel(address, options=message_size_options()) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="")
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stub = llm_pb2_grpc.LanguageModelStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Generate(request()):
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        await server.wait_ready(60)
        assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
        # Graceful stop: an in-flight generation finishes within the grace period.
        call = stub.Generate(request(max_new_tokens=30))
        first = await call.read()
        assert first.HasField("delta")
        stopping = asyncio.create_task(server.stop(10))
        responses = []
        while (response := await call.read()) is not grpc.aio.EOF:
            responses.append(response)
        assert responses[-1].HasField("final")
        assert responses[-1].final.usage.completion_tokens == 30
        await stopping
