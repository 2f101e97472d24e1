"""The OpenAI API breadth through the real `openai` client against the real stack (redis + vision + LLM +
gateway on a tiny random checkpoint): every field's effect is asserted, JSON outputs are validated against
their schema, refusals name the field, and every error is OpenAI-shaped."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from gateway_helpers import data_url, new_png
from ivl_llm.checkpoint import load_tokenizer

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                        "unit": {"enum": ["C", "F"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                                    "required": ["zone"], "additionalProperties": False}},
}
HELLO = [{"role": "user", "content": "Tell me about the weather and the time."}]


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.http_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_original):
    return load_tokenizer(tiny_original)


def create(client, **kwargs):
    return client.chat.completions.create(model="ivl", **{"messages": HELLO, **kwargs})


def test_logprobs_and_top_logprobs(client):
    reply = create(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert 1 <= len(content) <= reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    # a character split over byte tokens shows as U+FFFD in each token's text; their bytes join to the text
    assert b"".join(bytes(e.bytes) for e in content).decode().strip() == reply.choices[0].message.content
    plain = create(client, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content
    chunks = list(create(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=1, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_n_choices(client):
    reply = create(client, max_tokens=5, temperature=1.0, seed=3, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # sampled: they differ
    assert reply.usage.completion_tokens >= 3
    chunks = list(create(client, max_tokens=4, temperature=1.0, seed=3, n=2, stream=True))
    indices = {c.choices[0].index for c in chunks if c.choices}
    finishes = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert indices == {0, 1} and sorted(f.index for f in finishes) == [0, 1]


def test_logit_bias_and_penalties(client, tokenizer):
    token_id = 77
    text = tokenizer.decode([token_id])
    forced = create(client, max_tokens=5, temperature=0, logit_bias={str(token_id): 100}, logprobs=True)
    assert [e.token for e in forced.choices[0].logprobs.content] == [text] * 5

    def count(**extra) -> int:
        reply = create(client, max_tokens=10, temperature=0, logit_bias={str(token_id): 10}, logprobs=True, **extra)
        return [e.token for e in reply.choices[0].logprobs.content].count(text)

    assert count() == 10
    assert count(presence_penalty=2.0) < 10 and count(frequency_penalty=2.0) < 10
    assert count(extra_body={"repetition_penalty": 5.0}) < 10


def test_min_tokens_and_stop_token_ids(client, tokenizer):
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eager = {"logit_bias": {str(stop): 100}, "temperature": 0, "max_tokens": 12}
    assert create(client, **eager).usage.completion_tokens == 1
    held = create(client, **eager, extra_body={"min_tokens": 4})
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"
    forced = {"logit_bias": {"77": 100}, "temperature": 0, "max_tokens": 5}
    assert create(client, **forced).usage.completion_tokens == 5
    cut = create(client, **forced, extra_body={"stop_token_ids": [77]})  # the forced token now ends the reply
    assert cut.usage.completion_tokens == 1 and cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == ""


def test_response_format_json_schema_and_json_object(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in (1, 2):
        reply = create(client, max_tokens=100, temperature=1.0, seed=seed, response_format=fmt)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    chunks = list(create(client, max_tokens=100, temperature=0, response_format=fmt, stream=True))
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), PERSON)
    obj = create(client, max_tokens=150, temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    text = create(client, max_tokens=4, temperature=0, response_format={"type": "text"})
    assert text.choices[0].message.content == create(client, max_tokens=4, temperature=0).choices[0].message.content


def test_tools_required_named_auto_and_streamed(client):
    required = create(client, max_tokens=120, temperature=0, tools=[WEATHER, TIME], tool_choice="required",
                      parallel_tool_calls=False)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)

    named = create(client, max_tokens=120, temperature=1.0, seed=5, tools=[WEATHER, TIME],
                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = named.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"]
    jsonschema.validate(json.loads(calls[0].function.arguments), TIME["function"]["parameters"])

    auto = create(client, max_tokens=20, temperature=0, tools=[WEATHER])  # the model may answer or call
    message = auto.choices[0].message
    assert message.content or message.tool_calls
    for c in message.tool_calls or []:
        jsonschema.validate(json.loads(c.function.arguments), WEATHER["function"]["parameters"])
    with_tools = create(client, max_tokens=2, temperature=0, tools=[WEATHER])
    assert with_tools.usage.prompt_tokens > create(client, max_tokens=2, temperature=0).usage.prompt_tokens  # described

    chunks = list(create(client, max_tokens=120, temperature=0, tools=[WEATHER], tool_choice="required", stream=True))
    deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) >= 1 and deltas[0].function.name == "get_weather"
    jsonschema.validate(json.loads(deltas[0].function.arguments), WEATHER["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]

    history = [*HELLO, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    follow_up = client.chat.completions.create(model="ivl", messages=history, max_tokens=4, temperature=0, tools=[WEATHER],
                                               tool_choice="none")
    assert follow_up.choices[0].message.tool_calls is None and follow_up.choices[0].finish_reason in ("stop", "length")


def test_image_detail_sets_the_tiling(client):
    png = new_png(900, 300)

    def plan(detail: str | None) -> dict:
        part = {"type": "image_url", "image_url": {"url": data_url(png), **({"detail": detail} if detail else {})}}
        reply = client.chat.completions.create(model="ivl", max_tokens=1, temperature=0, messages=[
            {"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}])
        return reply.model_extra["ivl"]["images"][0]["plan"]

    low, high, auto = plan("low"), plan("high"), plan("auto")
    assert low["num_tiles"] == 1 and low["max_tiles"] == 1 and not low["has_thumbnail"]
    assert high["max_tiles"] == 6 and high["num_tiles"] > auto["num_tiles"]  # detail_high_max_tiles of the test stack
    assert auto["max_tiles"] == 2 == plan(None)["max_tiles"]  # the gateway's default_max_tiles


def test_models_and_unknown_model(client):
    assert client.models.retrieve("ckpt").id == "ckpt" and client.models.retrieve("ivl").id == "ivl"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-17")
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-17", messages=HELLO, max_tokens=1)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    assert "gpt-17" in caught.value.body["message"] and "'ckpt'" in caught.value.body["message"]
    assert create(client, max_tokens=1).model == "ivl"  # a response reports the name asked for


def test_user_and_usage_cached_tokens(client):
    reply = create(client, max_tokens=2, user="alice-42")
    assert reply.usage.prompt_tokens_details.cached_tokens >= 0 and reply.usage.total_tokens > 0


@pytest.mark.parametrize(("extra", "needle", "param"), [
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio is not supported", "audio"),
    ({"modalities": ["text", "audio"]}, "modalities is not supported", "modalities"),
    ({"reasoning_effort": "high"}, "reasoning_effort is not supported", "reasoning_effort"),
    ({"store": True}, "store is not supported", "store"),
    ({"frobnicate": 1}, "frobnicate is not supported: it is not a field", "frobnicate"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs", "top_logprobs"),
    ({"logit_bias": {"x": 1}}, "logit_bias keys are token ids", "logit_bias"),
    ({"tool_choice": "required"}, "tool_choice needs tools", "tool_choice"),
    ({"response_format": {"type": "json_object"}, "tools": [WEATHER]}, "cannot be combined", "response_format"),
    ({"n": 0}, "n is 0", "n"),
])
def test_unsupported_and_invalid_fields_are_refused_by_name(client, extra, needle, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="ivl", messages=HELLO, max_tokens=1, extra_body=extra)
    assert needle in caught.value.body["message"] and caught.value.body["param"] == param
    assert caught.value.body["type"] == "invalid_request_error"


def test_content_part_errors_name_message_and_part(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                             {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="ivl", messages=messages, max_tokens=1)
    assert caught.value.body["message"] == "message 0, part 1: type 'input_audio' is not supported; use 'text' or 'image_url'"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="ivl", messages=[{"role": "user", "content": "hi", "name": "bob"}], max_tokens=1)
    assert "message 0: name is not supported" in caught.value.body["message"]


def test_lenient_setting_drops_unsupported_fields_and_says_so(stack):
    with stack.extra_gateway(ignore_unsupported_fields=True, model_aliases=["ivl"]) as gateway:
        url = f"http://127.0.0.1:{gateway.ports.http}/v1/chat/completions"
        reply = httpx.post(url, timeout=60, json={"model": "ivl", "messages": HELLO, "max_tokens": 1,
                                                  "reasoning_effort": "low", "frobnicate": True})
        assert reply.status_code == 200 and reply.headers["x-ivl-ignored-fields"] == "reasoning_effort,frobnicate"


def test_every_error_is_openai_shaped(stack):
    base = stack.http_url

    def shaped(response: httpx.Response, status: int) -> dict:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return error

    assert shaped(httpx.get(base + "/v1/nothing-here"), 404)["code"] == "not_found"
    assert shaped(httpx.get(base + "/v1/chat/completions"), 405)["code"] == "method_not_allowed"
    assert shaped(httpx.post(base + "/v1/chat/completions", content=b"x", headers={"content-type": "text/plain"}),
                  415)["code"] == "unsupported_media_type"
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * (4 * 2**20) + b'"}]}'
    assert shaped(httpx.post(base + "/v1/chat/completions", content=big, headers={"content-type": "application/json"}),
                  413)["code"] == "payload_too_large"
    assert shaped(httpx.post(base + "/v1/chat/completions", json={"messages": 5}), 400)["param"] == "messages"


async def test_a_framework_validation_error_is_openai_shaped():
    from fastapi.exceptions import RequestValidationError
    from ivl_gateway.http_errors import install_error_handlers
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    app = Starlette()

    async def boom(request):
        raise RequestValidationError([{"loc": ("query", "limit"), "msg": "Input should be a valid integer"}])

    app.add_route("/x", boom)
    install_error_handlers(app)  # type: ignore[arg-type]
    response = TestClient(app).get("/x")
    assert response.status_code == 422
    assert response.json()["error"] == {"message": "invalid request at 'query.limit': Input should be a valid integer",
                                        "type": "invalid_request_error", "param": "query.limit",
                                        "code": "unprocessable_entity"}


def test_max_tokens_over_the_llms_limit_names_the_openai_field_and_the_real_cap(client):
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, max_tokens=9000)
    assert "max_tokens) is 9000; this server generates 1..8192 tokens per request" in caught.value.body["message"]
