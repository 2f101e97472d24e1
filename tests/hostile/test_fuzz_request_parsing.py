"""Property tests of the gateway's OpenAI request path, from the decoded JSON body to the bytes sent to
the LLM service: any body gives either a request ready to send or a ServingError with a 4xx status;
never another exception (which the HTTP layer would turn into a 500).

The pipeline under test is the one /v1/chat/completions runs before calling a service:
parse_request -> turn_from_request (data: URLs decoded, other URLs refused) -> collect_images ->
resolve_tiling -> llm_messages -> GenerateRequest serialised.
Bounded and deterministic (derandomize): 200 examples per property, a few seconds.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from ivl_gateway.conversation import TurnLimits, collect_images, llm_messages, resolve_tiling
from ivl_gateway.embedding_codec import TilingChoice
from ivl_gateway.image_fetch import ImageFetcher
from ivl_gateway.openai_request import parse_request
from ivl_gateway.openai_turn import turn_from_request
from ivl_gateway.settings import GatewaySettings
from ivl_proto.errors import ServingError
from ivl_proto.llm.v1 import llm_pb2

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GATEWAY = GatewaySettings(max_request_bytes=64 * 1024, max_text_chars=5_000, max_images_per_request=4)
LIMITS = TurnLimits(GATEWAY.max_images_per_request, GATEWAY.max_text_chars)
DEFAULT_TILING = TilingChoice(6, 1, True)
INT32_MAX = 2**31 - 1


def run_pipeline(payload: Any) -> bytes | ServingError:
    """What the HTTP API does before any downstream call; a ServingError is a refusal, returned."""
    try:
        body = parse_request(payload)
        turn = asyncio.run(turn_from_request(body, ImageFetcher(GATEWAY), GATEWAY, "chatcmpl-fuzz"))
        images = collect_images(turn, LIMITS)
        resolve_tiling(turn.tiling, DEFAULT_TILING, 40)
        request = llm_pb2.GenerateRequest(
            messages=llm_messages(turn, len(images)), sampling=turn.sampling, request_id=turn.request_id
        )
        return request.SerializeToString()
    except ServingError as error:
        assert 400 <= error.http_status < 500, error
        assert error.message
        return error


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(
    max_size=20
)
any_json = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
# Text a JSON decoder can give, surrogates excepted (see test_lone_surrogates_* below).
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
small_png = base64.b64encode(
    bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cf"
                  "c000000301010018dd8db00000000049454e44ae426082")
).decode()
urls = st.sampled_from([
    f"data:image/png;base64,{small_png}", "data:image/png;base64,", "data:image/png;base64,@@@", "data:,",
    "data:image/png", "http://127.0.0.1/x.png", "file:///etc/passwd", "", "javascript:1",
]) | texts.map(lambda t: "data:image/png;base64," + t)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts | st.none()}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": urls})}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "video", "text"])}),
    any_json,
)
messages = st.lists(
    st.fixed_dictionaries({
        "role": st.sampled_from(["user", "assistant", "system", "developer", "tool", ""]),
        "content": texts | st.lists(parts, max_size=3) | st.none() | any_json,
    }),
    max_size=4,
)
in_range = st.integers(-5, INT32_MAX) | st.none()
near_valid = st.fixed_dictionaries(
    {"messages": messages},
    optional={
        "model": texts, "stream": st.booleans(), "temperature": st.floats(-1, 3) | st.none(),
        "top_p": st.floats(-1, 2) | st.none(), "max_tokens": in_range, "max_completion_tokens": in_range,
        "top_k": in_range, "seed": st.integers(-1, 2**63) | st.none(), "stop": texts | st.lists(texts, max_size=3),
        "n": st.integers(0, 3), "max_tiles": in_range, "min_tiles": in_range, "use_thumbnail": st.booleans(),
        "repetition_penalty": st.floats(-1, 3) | st.none(), "stream_options": any_json,
    },
)


@FUZZ
@given(any_json)
def test_any_json_value_is_parsed_or_refused_with_a_4xx(payload):
    run_pipeline(payload)


@FUZZ
@given(near_valid)
def test_near_valid_bodies_are_parsed_or_refused_with_a_4xx(payload):
    run_pipeline(payload)


def test_the_pipeline_accepts_a_normal_request():
    out = run_pipeline({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{small_png}"}},
        {"type": "text", "text": "what is it?"}]}], "max_tokens": 5, "max_tiles": 2})
    assert isinstance(out, bytes)
    request = llm_pb2.GenerateRequest.FromString(out)
    assert request.messages[0].content == "<image>\nwhat is it?" and request.sampling.max_new_tokens == 5
    assert isinstance(run_pipeline({"messages": []}), ServingError)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "top_k", "seed", "max_tiles", "min_tiles"])
def test_out_of_range_integers_are_refused_not_500(field):
    value = 2**64 if field == "seed" else INT32_MAX + 1
    refused = run_pipeline({"messages": [{"role": "user", "content": "hi"}], field: value})
    assert isinstance(refused, ServingError) and field in refused.message


@settings(max_examples=10, deadline=None, derandomize=True, phases=[Phase.generate])
@given(texts, st.sampled_from(["\ud800", "\udfff", "\udc00", "\ud83d"]), texts)
def test_lone_surrogates_are_refused_not_500(before, surrogate, after):
    refused = run_pipeline({"messages": [{"role": "user", "content": before + surrogate + after}]})
    assert isinstance(refused, ServingError) and "lone surrogate" in refused.message
