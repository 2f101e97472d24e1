"""The LMDeploy TurboMind backend against a fake engine (LMDeploy cannot run here: no CUDA).

The fake checks what TurboMind needs: ids, one embedding per range with matching rows, ranges over the
'<IMG_CONTEXT>' runs; it records the configs, the cancellation (stream closed) and the session end.
The rest (prompt building, slots, gRPC) is the real service.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from ivl_llm.backends.lmdeploy_backend import LMDeployAPI, LMDeployBackend, load_lmdeploy_api
from ivl_llm.checkpoint import load_tokenizer, read_checkpoint
from ivl_llm.prompt import ImageEmbedding
from ivl_llm.sampling import Sampling
from ivl_llm.service import Finished, LLMService
from ivl_llm.templates import ChatMessage
from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.image_placeholder import IMG_CONTEXT_TOKEN
from ivl_proto.llm.v1 import llm_pb2, llm_pb2_grpc
from ivl_proto.tensor_codec import tensor_to_pb
from support.llm_server import running_llm_server, server_settings


class Status(enum.Enum):
    SUCCESS = 0
    FINISH = 1
    CANCEL = 2


@dataclass
class FakeEngineConfig:
    tp: int = 1
    session_len: int | None = None
    cache_max_entry_count: float = 0.8
    max_batch_size: int | None = None
    dtype: str = "auto"
    language_model_only: bool = False
    enable_prefix_caching: bool = False
    cache_prompt: str = "auto"
    cache_generation: str = "auto"
    enable_metrics: bool = True


@dataclass
class FakeGenerationConfig:
    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    random_seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)


class FakeInstance:
    def __init__(self, engine: FakeTurboMind) -> None:
        self.engine = engine

    async def async_stream_infer(self, session_id, input_ids, input_embeddings=None, input_embedding_ranges=None,
                                 multimodal=None, gen_config=None, stream_output=False, **kwargs):
        # LMDeploy 0.18's signature (tests/llm/test_lmdeploy_contract.py checks the real one)
        call = SimpleNamespace(session_id=session_id, input_ids=list(input_ids), embeddings=input_embeddings,
                               ranges=input_embedding_ranges, gen_config=gen_config, cancelled=False,
                               flags=(multimodal, stream_output, kwargs))
        self.engine.calls.append(call)
        embeddings, ranges = input_embeddings or [], input_embedding_ranges or []
        assert len(embeddings) == len(ranges), "one embedding per range"
        for emb, (start, end) in zip(embeddings, ranges, strict=True):
            assert isinstance(emb, torch.Tensor) and emb.shape[0] == end - start
            assert set(call.input_ids[start:end]) == {self.engine.context_id}
        try:
            for count, token in enumerate(self.engine.script(), start=1):
                await asyncio.sleep(self.engine.delay_s)
                done = token in gen_config.stop_token_ids or count >= gen_config.max_new_tokens
                yield SimpleNamespace(status=Status.FINISH if done else Status.SUCCESS, token_ids=[token])
                if done:
                    return
        except (GeneratorExit, asyncio.CancelledError):
            call.cancelled = True
            raise

    async def async_end(self, session_id):
        self.engine.ended.append(session_id)


class FakeTurboMind:
    def __init__(self, script, context_id: int, delay_s: float = 0.0) -> None:
        self.script, self.context_id, self.delay_s = script, context_id, delay_s
        self.calls: list[Any] = []
        self.ended: list[int] = []
        self.loaded: list[tuple[str, Any]] = []
        self.instances = 0

    def from_pretrained(self, path, engine_config):
        self.loaded.append((path, engine_config))
        return self

    def create_instance(self):
        self.instances += 1
        return FakeInstance(self)


async def until(predicate, timeout_s: float = 5.0) -> None:
    start = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - start < timeout_s, "condition not reached in time"
        await asyncio.sleep(0.005)


def make_service(ckpt, script, delay_s: float = 0.0, **overrides) -> tuple[LLMService, FakeTurboMind]:
    settings = server_settings(ckpt, backend="lmdeploy", max_concurrency=2, instances=2, **overrides)
    tokenizer = load_tokenizer(ckpt)
    fake = FakeTurboMind(script, tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN), delay_s)
    api = LMDeployAPI(turbomind=fake, engine_config=FakeEngineConfig, generation_config=FakeGenerationConfig)
    backend = LMDeployBackend(read_checkpoint(ckpt), settings, api=api)
    service = LLMService(settings, backend=backend, tokenizer=tokenizer)
    return service, fake


async def test_engine_receives_ids_ranges_embeddings_and_configs(tiny_original):
    probe, _ = make_service(tiny_original, lambda: iter(()))
    tok = probe.tokenizer
    answer = tok("hello world", add_special_tokens=False)["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    service, fake = make_service(tiny_original, lambda: iter([*answer, im_end, 7, 7]))
    await service.start()
    first = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    second = np.random.default_rng(1).standard_normal((512, 64)).astype(np.float32)
    bits = (second.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bit pattern
    messages = [ChatMessage("user", "Image-1: <image>\nImage-2: <image>\nCompare.")]
    embeddings = [ImageEmbedding(first, "float32"), ImageEmbedding(bits, "bfloat16")]
    events = [e async for e in service.generate(messages, embeddings, Sampling(max_new_tokens=20, seed=3))]
    assert "".join(e.text for e in events[:-1]) == "hello world"
    assert isinstance(events[-1], Finished) and events[-1].reason == "stop"

    (path, engine_config), = fake.loaded
    assert path == str(tiny_original)
    assert engine_config.language_model_only is True and engine_config.max_batch_size == 2
    assert engine_config.session_len == 32768
    assert engine_config.enable_prefix_caching is True
    assert fake.instances == 2

    call = fake.calls[-1]
    prepared = service.builder.prepare(messages, embeddings, 20)
    assert call.input_ids == prepared.input_ids
    assert call.ranges == [list(r) for r in prepared.embedding_ranges]
    assert [b - a for a, b in call.ranges] == [256, 512]
    assert torch.equal(call.embeddings[0], torch.from_numpy(first))
    assert call.embeddings[1].dtype == torch.bfloat16
    assert torch.equal(call.embeddings[1].view(torch.int16), torch.from_numpy(bits.view(np.int16)))
    assert call.flags == (None, True, {})  # no legacy sequence_start/sequence_end/step arguments
    config = call.gen_config
    assert config.max_new_tokens == 20 and config.do_sample is False and config.top_k == 1
    assert config.random_seed == 3
    assert config.stop_token_ids == [im_end]  # the template separator only, as the reference stops
    await until(lambda: service.scheduler.active == 0)  # the slot comes back once the session is ended
    assert fake.ended == [call.session_id]
    assert service.backend.pool.qsize() == 2
    await service.close()


async def test_sampling_parameters_reach_the_engine(tiny_original):
    service, fake = make_service(tiny_original, lambda: iter([5, 6, 7]))
    await service.start()
    sampling = Sampling(max_new_tokens=3, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=11)
    events = [e async for e in service.generate([ChatMessage("user", "hi")], [], sampling)]
    assert events[-1].reason == "length" and events[-1].usage.completion_tokens == 3
    config = fake.calls[-1].gen_config
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.7, pytest.approx(0.9), 40)
    assert (config.repetition_penalty, config.random_seed) == (pytest.approx(1.1), 11)
    assert fake.calls[-1].embeddings is None and fake.calls[-1].ranges is None


async def test_grpc_cancel_closes_the_stream_ends_the_session_and_frees_slot_and_instance(tiny_original):
    service, fake = make_service(tiny_original, lambda: iter(lambda: 9, None), delay_s=0.01)
    async with (
        running_llm_server(tiny_original, service=service) as (address, _),
        grpc.aio.insecure_channel(address, options=message_size_options()) as channel,
    ):
        stub = llm_pb2_grpc.LanguageModelStub(channel)
        info = await stub.Info(llm_pb2.InfoRequest())
        assert (info.backend, info.device) == ("lmdeploy", "cuda")
        request = llm_pb2.GenerateRequest(
            messages=[llm_pb2.Message(role=common_pb2.ROLE_USER, content="<image>\nhi")],
            image_embeddings=[tensor_to_pb(np.zeros((256, 64), np.float32))],
            sampling=common_pb2.SamplingParams(max_new_tokens=5000),
        )
        call = stub.Generate(request)
        while not (await call.read()).delta.text:
            pass
        assert service.scheduler.active == 1 and service.backend.pool.qsize() == 1
        call.cancel()
        await until(lambda: service.scheduler.active == 0 and service.backend.pool.qsize() == 2)
        assert fake.calls[-1].cancelled
        assert fake.ended == [fake.calls[-1].session_id]


def test_without_lmdeploy_the_error_says_how_to_install():
    try:
        import lmdeploy  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("lmdeploy is installed here")
    with pytest.raises(ServingError) as caught:
        load_lmdeploy_api()
    assert caught.value.code is ErrorCode.FAILED_PRECONDITION
    assert "pip install 'ivl-llm[lmdeploy]'" in caught.value.message
