"""The LMDeploy backend against LMDeploy 0.18.0's real Python layer, only its compiled `_turbomind` extension
stubbed (tests/support/turbomind_stub.py; the wheel is fetched by scripts/setup_env.sh into .cache/).

Checked: every name, signature and config field the backend uses exists with the meaning it assumes
(TurboMind.from_pretrained / create_instance / close, TurboMindInstance.async_stream_infer / async_end,
TurbomindEngineConfig and GenerationConfig with their own validation); what the real request path makes
of our arguments (`_get_generation_config`: greedy = top_k 1, stop ids; `prepare_inputs`: the prompt ids,
the embeddings concatenated in the engine dtype, the ranges); and a whole generation through the real
`async_stream_infer` loop (streaming, cancellation, error statuses, cached-token metrics) on the stub
engine, plus which checkpoints TurboMind accepts (`is_supported`) and the dtype it resolves for them.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import inspect
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from ivl_llm.backends.lmdeploy_backend import LMDeployAPI, LMDeployBackend, load_lmdeploy_api
from ivl_llm.checkpoint import read_checkpoint
from ivl_llm.prompt import ImageEmbedding
from ivl_llm.sampling import Guided, Sampling
from ivl_llm.service import Finished, LLMService
from ivl_llm.templates import ChatMessage
from ivl_proto.errors import ErrorCode, ServingError
from PIL import ImageFile
from support import turbomind_stub
from support.llm_server import server_settings

VERSION = "0.18.0"
ROOT = Path(__file__).resolve().parents[2]
LAYER = ROOT / ".cache" / f"lmdeploy-{VERSION}"


@pytest.fixture(scope="module")
def lmdeploy() -> Iterator[Any]:
    """LMDeploy's real modules, imported with the stub extension; removed again after this module."""
    if not (LAYER / ".complete").exists():
        pytest.skip(
            f"LMDeploy {VERSION}'s Python layer is not in {LAYER}: scripts/setup_env.sh fetches it "
            "(pip download lmdeploy, 106 MB) and could not reach a package index on this machine"
        )
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    saved_truncated = ImageFile.LOAD_TRUNCATED_IMAGES  # lmdeploy.vl sets this PIL global at import
    sys.path[:0] = [str(LAYER / "site"), str(LAYER / "deps")]
    turbomind_stub.install()
    try:
        import lmdeploy
        import lmdeploy.turbomind.turbomind

        assert lmdeploy.__version__ == VERSION
        assert Path(lmdeploy.__file__).is_relative_to(LAYER)
        yield lmdeploy
    finally:
        sys.path[:] = saved_path
        ImageFile.LOAD_TRUNCATED_IMAGES = saved_truncated
        for name in set(sys.modules) - saved_modules:
            if name == "lmdeploy" or name.startswith("lmdeploy."):
                del sys.modules[name]


def real_api(lmdeploy: Any, comm: turbomind_stub.StubModelComm) -> LMDeployAPI:
    """The real classes; from_pretrained binds our call to the real signature, then builds a real TurboMind
    around the stub engine the way __init__ would, minus the CUDA-only weight loading."""
    from lmdeploy.archs import get_model_arch
    from lmdeploy.turbomind.converter import _resolve_dtype
    from lmdeploy.turbomind.turbomind import TurboMind

    class Loader:
        @staticmethod
        def from_pretrained(path: str, **kwargs: Any) -> Any:
            inspect.signature(TurboMind.from_pretrained).bind(path, **kwargs)
            config = kwargs["engine_config"]
            engine = TurboMind.__new__(TurboMind)
            engine.engine_config = copy.deepcopy(config)  # as TurboMind.__init__ does
            # what get_tm_config does before the CUDA part: resolve 'auto' against the checkpoint
            engine.engine_config.dtype = _resolve_dtype(config.dtype, get_model_arch(path)[1], {"bfloat16", "float16"})
            engine.model_comm, engine.source_model, engine.session_len = comm, None, config.session_len
            return engine

    return LMDeployAPI(Loader, lmdeploy.TurbomindEngineConfig, lmdeploy.GenerationConfig)


def test_the_backend_imports_the_names_it_uses(lmdeploy):
    api = load_lmdeploy_api()
    from lmdeploy.turbomind.turbomind import TurboMind, TurboMindInstance

    assert (api.turbomind, api.engine_config, api.generation_config) == (
        TurboMind, lmdeploy.TurbomindEngineConfig, lmdeploy.GenerationConfig
    )
    assert "engine_config" in inspect.signature(TurboMind.from_pretrained).parameters
    assert list(inspect.signature(TurboMind.create_instance).parameters) == ["self", "cuda_stream_id"]
    assert callable(TurboMind.close)
    stream = inspect.signature(TurboMindInstance.async_stream_infer).parameters
    # each keyword the backend passes is a named parameter, not swallowed by **kwargs
    assert {"session_id", "input_ids", "input_embeddings", "input_embedding_ranges", "gen_config", "stream_output"} <= set(stream)
    assert not {"sequence_start", "sequence_end", "step"} & set(stream)  # 0.18 dropped them: we do not pass them
    assert inspect.iscoroutinefunction(TurboMindInstance.async_end)


def test_every_engine_config_field_we_set_exists_and_validates(lmdeploy, tiny_qwen2_original):
    settings = server_settings(tiny_qwen2_original, backend="lmdeploy", max_concurrency=3, dtype="bfloat16",
                               cache_prompt="all", cache_generation="none")
    backend = LMDeployBackend(read_checkpoint(tiny_qwen2_original), settings, api=real_api(lmdeploy, None))
    fields = {f.name for f in dataclasses.fields(lmdeploy.TurbomindEngineConfig)}
    assert set(backend.engine_values()) <= fields  # nothing silently dropped for this version
    config = backend.engine_config()
    assert isinstance(config, lmdeploy.TurbomindEngineConfig)
    assert (config.language_model_only, config.enable_prefix_caching, config.enable_metrics) == (True, True, True)
    assert (config.cache_prompt, config.cache_generation, config.max_batch_size) == ("all", "none", 3)
    assert (config.dtype, config.session_len, config.cache_max_entry_count) == ("bfloat16", 32768, 0.8)
    float32 = LMDeployBackend(read_checkpoint(tiny_qwen2_original), server_settings(tiny_qwen2_original),
                              api=real_api(lmdeploy, None))
    assert float32.engine_config().dtype == "auto"  # TurboMind has no float32 weights: it picks bf16/fp16
    with pytest.raises(ValueError, match="invalid cache_prompt"):  # its validation; our settings' Literals mirror it
        lmdeploy.TurbomindEngineConfig(cache_prompt="sometimes")


def test_generation_config_means_what_we_assume(lmdeploy, tiny_qwen2_original):
    from lmdeploy.turbomind.turbomind import TurboMindInstance

    backend = LMDeployBackend(read_checkpoint(tiny_qwen2_original), server_settings(tiny_qwen2_original),
                              api=real_api(lmdeploy, None))
    prompt = SimpleNamespace(max_new_tokens=9)
    greedy = backend.generation_config(prompt, Sampling(), [7, 3])
    native = TurboMindInstance._get_generation_config(None, greedy)  # the real conversion for the engine
    assert (native.max_new_tokens, native.top_k, native.eos_ids) == (9, 1, [7, 3])  # TurboMind ignores do_sample
    assert native.stop_ids == [[7, 3], [1, 2]]  # stop_token_ids end the sequence (and are not returned)
    assert not hasattr(native, "random_seed")
    sampled = backend.generation_config(prompt, Sampling(temperature=0.7, top_p=0.9, top_k=0, seed=5,
                                                          repetition_penalty=1.2), [7])
    native = TurboMindInstance._get_generation_config(None, sampled)
    assert (native.temperature, native.top_p, native.top_k, native.random_seed) == (0.7, 0.9, 0, 5)
    assert native.repetition_penalty == 1.2
    with pytest.raises(AssertionError):
        lmdeploy.GenerationConfig(temperature=2.5)  # LMDeploy asserts: the backend answers first, clearly
    with pytest.raises(ServingError) as caught:
        backend.generation_config(prompt, Sampling(temperature=2.5), [7])
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT and "0 (greedy) .. 2.0" in caught.value.message


def test_the_new_sampling_fields_reach_turbomind_as_assumed(lmdeploy, tiny_qwen2_original):
    """Every GenerationConfig field the backend sets for the OpenAI-style sampling options exists, passes
    LMDeploy's own validation, and becomes the engine field we mean (bad ids, min tokens, logprobs)."""
    from lmdeploy.turbomind.turbomind import TurboMindInstance

    backend = LMDeployBackend(read_checkpoint(tiny_qwen2_original), server_settings(tiny_qwen2_original),
                              api=real_api(lmdeploy, None))
    fields = {f.name for f in dataclasses.fields(lmdeploy.GenerationConfig)}
    prompt = SimpleNamespace(max_new_tokens=9)
    sampling = Sampling(temperature=0.5, seed=4, logit_bias=((11, -100.0), (12, -100.0)), min_new_tokens=3,
                        logprobs=True, top_logprobs=5, stop_token_ids=(8,), n=2,
                        guided=Guided("json_schema", json_schema=json.dumps({"type": "object"})))
    config = backend.generation_config(prompt, sampling, [7, 8], choice=1)
    assert {"bad_token_ids", "min_new_tokens", "logprobs", "response_format", "random_seed"} <= fields
    assert (config.bad_token_ids, config.min_new_tokens, config.logprobs) == ([11, 12], 3, 5)
    assert config.random_seed == 5  # choice 1 of a seeded request: seed + 1, so the choices differ
    assert config.response_format == {"type": "json_schema", "json_schema": {"name": "response", "schema": {"type": "object"}}}
    native = TurboMindInstance._get_generation_config(None, config)
    assert native.bad_ids == [[11, 12], [1, 2]] and native.min_new_tokens == 3 and native.output_logprobs == 5
    assert native.eos_ids == [7, 8] and native.random_seed == 5
    only_logprob = backend.generation_config(prompt, Sampling(logprobs=True), [7])
    assert only_logprob.logprobs == 1  # the chosen token's logprob needs the engine's top-1 at least
    plain = backend.generation_config(prompt, Sampling(), [7])
    assert plain.min_new_tokens is None and plain.logprobs is None and plain.response_format is None


@pytest.mark.parametrize("guided", [
    Guided("json_object"),
    Guided("json_schema", json_schema=json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                                                  "required": ["a"]})),
    Guided("tool_calls", call_schemas=(json.dumps({"type": "object", "properties": {"name": {"const": "f"}}}),),
           required=True, parallel=True),
    Guided("tool_calls", call_schemas=(json.dumps({"type": "object"}), json.dumps({"type": "object"})), required=False),
])
def test_our_response_formats_pass_lmdeploys_own_check(lmdeploy, guided):
    """TurboMind disables guided decoding with only a warning when its compile fails: the formats we send
    must be ones LMDeploy's own check (`ensure_response_format_compilable`, real xgrammar) accepts."""
    from ivl_llm.backends.lmdeploy_backend import response_format
    from lmdeploy._guided_decoding import _grammar_source, ensure_response_format_compilable

    fmt = response_format(guided)
    ensure_response_format_compilable(fmt)
    kind, _ = _grammar_source(fmt)
    assert kind == {"json_object": "json_schema", "json_schema": "json_schema", "tool_calls": "structural_tag"}[guided.kind]


@pytest.mark.parametrize(("sampling", "needle"), [
    (Sampling(presence_penalty=0.5), "presence_penalty is not supported by the lmdeploy backend"),
    (Sampling(frequency_penalty=-0.5), "frequency_penalty is not supported by the lmdeploy backend"),
    (Sampling(logit_bias=((3, 2.0),)), "logit_bias is not supported by the lmdeploy backend: TurboMind can only ban"),
])
def test_what_turbomind_cannot_do_is_refused_by_name(lmdeploy, tiny_qwen2_original, sampling, needle):
    backend = LMDeployBackend(read_checkpoint(tiny_qwen2_original), server_settings(tiny_qwen2_original),
                              api=real_api(lmdeploy, None))
    with pytest.raises(ServingError) as caught:
        backend.generation_config(SimpleNamespace(max_new_tokens=4), sampling, [7])
    assert needle in caught.value.message and caught.value.code is ErrorCode.INVALID_ARGUMENT


def test_prepare_inputs_concatenates_our_embeddings_in_the_engine_dtype(lmdeploy, tiny_original):
    comm = turbomind_stub.StubModelComm(script=lambda: iter(()))
    settings = server_settings(tiny_original, backend="lmdeploy", dtype="float16")
    service = LLMService(settings, backend=LMDeployBackend(read_checkpoint(tiny_original), settings, api=real_api(lmdeploy, comm)))
    rng = np.random.default_rng(0)
    first = rng.standard_normal((256, 64)).astype(np.float32)
    second = (rng.standard_normal((512, 64)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    embeddings = [ImageEmbedding(first, "float32"), ImageEmbedding(second, "bfloat16")]
    prompt = service.builder.prepare([ChatMessage("user", "Image-1: <image>\nImage-2: <image>\nCompare.")], embeddings, 8)

    from ivl_llm.backends.lmdeploy_backend import embedding_for_engine
    from lmdeploy.turbomind.turbomind import TurboMind

    engine = real_api(lmdeploy, comm).turbomind.from_pretrained(str(tiny_original), engine_config=service.backend.engine_config())
    instance = TurboMind.create_instance(engine)
    inputs, length = instance.prepare_inputs(
        list(prompt.input_ids), gen_config=None,
        input_embeddings=[embedding_for_engine(e) for e in embeddings],
        input_embedding_ranges=[list(r) for r in prompt.embedding_ranges],
    )
    assert length == prompt.prompt_tokens and inputs["input_ids"].tolist() == prompt.input_ids
    values, ranges = inputs["input_embeddings"], inputs["input_embedding_ranges"]
    assert values.dtype == torch.float16 and values.shape == (768, 64)
    assert torch.equal(values[:256], torch.from_numpy(first).half())
    as_bf16 = torch.from_numpy(second.view(np.int16)).view(torch.bfloat16)
    assert torch.equal(values[256:], as_bf16.half())
    assert ranges.dtype == torch.int32 and ranges.tolist() == [list(r) for r in prompt.embedding_ranges]


async def make_service(lmdeploy, ckpt, script, **overrides) -> tuple[LLMService, turbomind_stub.StubModelComm]:
    comm = turbomind_stub.StubModelComm(script=script, delay_s=0.002, **overrides)
    settings = server_settings(ckpt, backend="lmdeploy", max_concurrency=2, instances=2, warmup=False)
    service = LLMService(settings, backend=LMDeployBackend(read_checkpoint(ckpt), settings, api=real_api(lmdeploy, comm)))
    await service.start()
    return service, comm


async def test_a_generation_through_the_real_stream_loop(lmdeploy, tiny_qwen2_original):
    probe = LLMService(server_settings(tiny_qwen2_original, warmup=False))
    answer = probe.tokenizer(" hello world \n", add_special_tokens=False)["input_ids"]
    im_end = probe.tokenizer.convert_tokens_to_ids("<|im_end|>")
    service, comm = await make_service(lmdeploy, tiny_qwen2_original, lambda: iter([*answer, im_end, 5, 5]), cached_tokens=17)
    embedding = ImageEmbedding(np.ones((256, 64), np.float32), "float32")
    events = [e async for e in service.generate([ChatMessage("user", "<image>\nHi")], [embedding], Sampling(max_new_tokens=20))]
    final = events[-1]
    assert isinstance(final, Finished) and final.reason == "stop"
    assert "".join(e.text for e in events[:-1]) == "hello world"  # stripped like the reference's reply
    assert final.usage.completion_tokens == len(answer)  # TurboMind does not return the stop token
    assert final.usage.cached_prompt_tokens == 17 and final.usage.prefill_s > 0  # from its request metrics
    call = comm.calls[-1]
    assert call.stream_output is True and call.enable_metrics is True and call.mm_inputs is None
    assert call.session.step == 0 and call.gen_cfg.eos_ids == [im_end]
    assert call.inputs["input_embedding_ranges"].tolist() == [[r[0], r[1]] for r in
                                                               service.builder.prepare([ChatMessage("user", "<image>\nHi")], [embedding], 20).embedding_ranges]
    await service.close()


async def test_cancelling_reaches_the_engine_and_frees_slot_and_instance(lmdeploy, tiny_qwen2_original):
    service, comm = await make_service(lmdeploy, tiny_qwen2_original, lambda: iter(lambda: 9, None))
    events = service.generate([ChatMessage("user", "hi")], [], Sampling(max_new_tokens=4000))
    async for event in events:
        if getattr(event, "text", ""):
            break
    await events.aclose()
    for _ in range(500):
        if service.scheduler.active == 0 and service.backend.pool.qsize() == 2:
            break
        await asyncio.sleep(0.01)
    assert comm.calls[-1].cancelled  # the real loop called model_inst.cancel() when the stream closed
    assert service.scheduler.active == 0 and service.backend.pool.qsize() == 2
    await service.close()


async def test_logprobs_and_two_choices_through_the_real_stream_loop(lmdeploy, tiny_qwen2_original):
    """logprobs: the real `_get_logprobs` output ({id: logprob} per token) becomes our TokenLogprob entries;
    n=2: two sequences on two instances, seeds seed and seed + 1, both streamed, slot and instances back."""
    service, comm = await make_service(lmdeploy, tiny_qwen2_original, lambda: iter([40, 41, 42]))
    sampling = Sampling(max_new_tokens=3, temperature=0.7, seed=9, n=2, logprobs=True, top_logprobs=2)
    events = [e async for e in service.generate([ChatMessage("user", "hi")], [], sampling)]
    final = events[-1]
    assert isinstance(final, Finished) and final.choice_reasons == ("length", "length")
    by_choice = {i: [lp for e in events[:-1] if e.index == i for lp in e.logprobs] for i in (0, 1)}
    for entries in by_choice.values():
        assert [e.token_id for e in entries] == [40, 41, 42]
        assert all(e.logprob == -0.5 and [t.token_id for t in e.top] == [e.token_id, e.token_id + 1] for e in entries)
        assert all([t.logprob for t in e.top] == [-0.5, -1.5] for e in entries)
    assert final.usage.completion_tokens == 6
    assert sorted(call.gen_cfg.random_seed for call in comm.calls[-2:]) == [9, 10]
    assert all(call.gen_cfg.output_logprobs == 2 for call in comm.calls[-2:])
    for _ in range(500):  # the slot comes back once the engine has let go (a callback of the next loop turn)
        if service.scheduler.active == 0 and service.backend.pool.qsize() == 2:
            break
        await asyncio.sleep(0.01)
    assert service.scheduler.active == 0 and service.backend.pool.qsize() == 2
    await service.close()


@pytest.mark.parametrize(("status", "code"), [(6, ErrorCode.INVALID_ARGUMENT), (10, ErrorCode.RESOURCE_EXHAUSTED),
                                              (11, ErrorCode.RESOURCE_EXHAUSTED), (5, ErrorCode.INTERNAL)])
async def test_engine_error_statuses_become_errors_a_person_can_act_on(lmdeploy, tiny_qwen2_original, status, code):
    service, _ = await make_service(lmdeploy, tiny_qwen2_original, lambda: iter([1]), final_status=status)
    with pytest.raises(ServingError) as caught:
        async for _ in service.generate([ChatMessage("user", "hi")], [], Sampling(max_new_tokens=4)):
            pass
    assert caught.value.code is code
    await service.close()


def test_turbomind_accepts_both_tiny_layouts_and_resolves_their_dtype(lmdeploy, tiny_original, tiny_qwen2_original, tiny_native):
    from lmdeploy.archs import get_model_arch
    from lmdeploy.turbomind.converter import _resolve_dtype
    from lmdeploy.turbomind.supported_models import is_supported

    for folder in (tiny_original, tiny_qwen2_original, tiny_native):
        assert is_supported(str(folder))
    arch, config = get_model_arch(str(tiny_original))
    assert arch == "InternVLChatModel"
    assert _resolve_dtype("auto", config, {"bfloat16", "float16"}) == "bfloat16"  # float32 checkpoint -> bf16
