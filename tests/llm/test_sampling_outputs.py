"""Sampling and outputs of the transformers backend, effect asserted on the real tiny model: logprobs and
top_logprobs, n choices from one prefill, presence/frequency penalties, logit_bias, min_tokens, stop token ids,
guided decoding (JSON object, JSON Schema validated with jsonschema, tool calls), and the refusals."""

from __future__ import annotations

import json
import math

import jsonschema
import pytest
import pytest_asyncio
from ivl_llm.sampling import Guided, Sampling
from ivl_llm.service import Finished, LLMService
from ivl_llm.templates import ChatMessage
from ivl_proto.errors import ServingError
from support.llm_server import server_settings

PROMPT = [ChatMessage("user", "Tell me a story about a cat.")]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}


pytestmark = pytest.mark.asyncio(loop_scope="module")  # one model for the module, in one event loop


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(tiny_original):
    svc = LLMService(server_settings(tiny_original, warmup=False, max_concurrency=2))
    await svc.start()
    yield svc
    await svc.close()


async def run(service: LLMService, sampling: Sampling, messages=PROMPT) -> tuple[dict[int, list], Finished]:
    deltas: dict[int, list] = {}
    final = None
    async for event in service.generate(messages, [], sampling):
        if isinstance(event, Finished):
            final = event
        else:
            deltas.setdefault(event.index, []).append(event)
    assert final is not None
    return deltas, final


def text(deltas: dict[int, list], index: int = 0) -> str:
    return "".join(d.text for d in deltas.get(index, []))


def ids(deltas: dict[int, list], index: int = 0) -> list[int]:
    return [t for d in deltas.get(index, []) for t in d.token_ids]


async def test_logprobs_and_top_logprobs_are_the_models_distribution(service):
    deltas, final = await run(service, Sampling(max_new_tokens=8, logprobs=True, top_logprobs=3))
    entries = [e for d in deltas[0] for e in d.logprobs]
    assert len(entries) == len(ids(deltas)) == 8 and final.reason == "length"
    for entry, token_id in zip(entries, ids(deltas), strict=True):
        assert entry.token_id == token_id and entry.logprob <= 0
        assert len(entry.top) == 3 and entry.top[0].token_id == token_id  # greedy: the chosen one is the most likely
        assert entry.top[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
        assert sum(math.exp(t.logprob) for t in entry.top) <= 1.0 + 1e-5
        assert entry.token_bytes.decode("utf-8", errors="replace") == entry.token
    plain, _ = await run(service, Sampling(max_new_tokens=8))
    assert all(not d.logprobs for d in plain[0]) and ids(plain) == ids(deltas)  # logprobs change nothing else


async def test_n_choices_come_from_one_prefill(service, monkeypatch):
    model = service.backend.model
    forwards: list[tuple[int, int]] = []
    original = model.forward

    def counting(*args, **kwargs):
        embeds, input_ids = kwargs.get("inputs_embeds"), kwargs.get("input_ids")
        shape = (embeds if embeds is not None else input_ids).shape
        forwards.append((int(shape[0]), int(shape[1])))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counting)
    sampling = Sampling(max_new_tokens=6, temperature=1.0, seed=11, n=3)
    deltas, final = await run(service, sampling, [ChatMessage("user", "A fresh prompt for three choices.")])
    prefills = [f for f in forwards if f[1] > 1]
    assert len(prefills) == 1 and prefills[0][0] == 1  # the prompt once, batch 1
    assert all(batch == 3 for batch, length in forwards if length == 1)  # every decode step: all choices at once
    assert sorted(deltas) == [0, 1, 2] and len(final.choice_reasons) == 3
    assert final.usage.completion_tokens == sum(len(ids(deltas, i)) for i in range(3)) == 18
    assert len({tuple(ids(deltas, i)) for i in range(3)}) > 1  # sampled: the choices differ
    again, _ = await run(service, sampling, [ChatMessage("user", "A fresh prompt for three choices.")])
    assert [ids(again, i) for i in range(3)] == [ids(deltas, i) for i in range(3)]  # seeded: reproducible


async def test_logit_bias_forces_and_bans_tokens(service):
    baseline, _ = await run(service, Sampling(max_new_tokens=6))
    first = ids(baseline)[0]
    forced, _ = await run(service, Sampling(max_new_tokens=6, logit_bias=((77, 100.0),)))
    assert ids(forced) == [77] * 6
    banned, _ = await run(service, Sampling(max_new_tokens=6, logit_bias=((first, -100.0),)))
    assert first not in ids(banned) and ids(banned) != ids(baseline)


async def test_presence_and_frequency_penalties_break_repetition(service):
    def pushed(**penalties: float) -> Sampling:  # token 77 pushed up by 10: greedy repeats it
        return Sampling(max_new_tokens=10, logit_bias=((77, 10.0),), **penalties)

    counts = {}
    for name, penalties in {"none": {}, "presence": {"presence_penalty": 2.0}, "frequency": {"frequency_penalty": 2.0},
                            "both": {"presence_penalty": 2.0, "frequency_penalty": 2.0}}.items():
        deltas, _ = await run(service, pushed(**penalties))
        counts[name] = ids(deltas).count(77)
    assert counts["none"] == 10
    assert 1 <= counts["presence"] < 10 and 1 <= counts["frequency"] < 10
    assert counts["both"] <= min(counts["presence"], counts["frequency"])
    mild, _ = await run(service, Sampling(max_new_tokens=10, logit_bias=((77, 7.0),)))
    negative, _ = await run(service, Sampling(max_new_tokens=10, logit_bias=((77, 7.0),), frequency_penalty=-2.0))
    assert ids(negative).count(77) > ids(mild).count(77)  # a negative penalty favours repeating


async def test_min_tokens_and_stop_token_ids(service):
    stop = service.tokenizer.convert_tokens_to_ids("<|im_end|>")
    eager = Sampling(max_new_tokens=12, logit_bias=((stop, 100.0),))
    _, final = await run(service, eager)
    assert final.reason == "stop" and final.usage.completion_tokens == 1  # the end-of-turn token at once
    held, final = await run(service, Sampling(max_new_tokens=12, logit_bias=((stop, 100.0),), min_new_tokens=5))
    assert final.reason == "stop" and len(ids(held)) == 5 and final.usage.completion_tokens == 6
    baseline, _ = await run(service, Sampling(max_new_tokens=8))
    third = ids(baseline)[2]
    cut, final = await run(service, Sampling(max_new_tokens=8, stop_token_ids=(third,)))
    assert final.reason == "stop" and ids(cut) == ids(baseline)[:2]  # the stop id ends it and is not output


async def test_json_schema_output_validates(service):
    for seed in range(3):
        sampling = Sampling(max_new_tokens=120, temperature=1.0, seed=seed,
                            guided=Guided("json_schema", json_schema=json.dumps(PERSON)))
        deltas, final = await run(service, sampling)
        assert final.reason == "stop", text(deltas)
        jsonschema.validate(json.loads(text(deltas)), PERSON)


async def test_json_object_output_parses(service):
    deltas, final = await run(service, Sampling(max_new_tokens=200, guided=Guided("json_object")))
    assert final.reason == "stop"
    assert isinstance(json.loads(text(deltas)), dict)


async def test_tool_calls_required_and_parallel(service):
    call = {"type": "object", "properties": {
        "name": {"const": "get_weather"},
        "arguments": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                      "required": ["city"], "additionalProperties": False}},
        "required": ["name", "arguments"], "additionalProperties": False}
    guided = Guided("tool_calls", call_schemas=(json.dumps(call),), required=True)
    deltas, final = await run(service, Sampling(max_new_tokens=150, guided=guided))
    body = text(deltas)
    assert final.reason == "stop" and body.startswith("<tool_call>") and body.endswith("</tool_call>"), body
    inner = body.removeprefix("<tool_call>").removesuffix("</tool_call>")
    jsonschema.validate(json.loads(inner), call)


@pytest.mark.parametrize(("sampling", "needle"), [
    (Sampling(presence_penalty=2.5), "presence_penalty is 2.5; it must be between -2 and 2"),
    (Sampling(logit_bias=((5, 101.0),)), "logit_bias of token 5 is 101.0"),
    (Sampling(logit_bias=((10**7, 1.0),)), "logit_bias: token id 10000000 is not in the model's vocabulary"),
    (Sampling(top_logprobs=2), "top_logprobs needs logprobs"),
    (Sampling(logprobs=True, top_logprobs=21), "top_logprobs is 21"),
    (Sampling(n=17), "n is 17; it must be between 1 and 16"),
    (Sampling(max_new_tokens=4, min_new_tokens=5), "min_tokens is 5; it must not exceed max_tokens (4)"),
    (Sampling(stop_token_ids=(-1,)), "stop_token_ids: token id -1"),
    (Sampling(guided=Guided("json_schema", json_schema="{not json")), "response_format json_schema is not valid JSON"),
    (Sampling(guided=Guided("json_schema", json_schema='{"type": "nonsense"}')), "could not be compiled"),
])
async def test_bad_values_are_refused_by_name(service, sampling, needle):
    with pytest.raises(ServingError) as caught:
        await run(service, sampling)
    assert needle in caught.value.message and caught.value.http_status == 400
