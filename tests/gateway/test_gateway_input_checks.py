"""Bad input the hostile/fuzz runs found giving 500s or unclear statuses, now refused clearly, end to end:
lone surrogates, integers beyond the proto fields, deeply nested or non-finite JSON, tiling options
without images, "too large" images as 413 (the gateway's own byte check and the vision service's
limits carried across gRPC in trailing metadata), and image errors named once."""

from __future__ import annotations

import grpc
import httpx
import pytest
from gateway_helpers import data_url, new_png
from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ERROR_CODE_METADATA_KEY, ErrorCode, from_grpc_error
from ivl_proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.vision.v1 import vision_pb2, vision_pb2_grpc
from support.hostile_images import png_bomb, png_padded_to
from support.stack import running_stack

SMALL_IMAGE_BYTES = 64 * 1024
SMALL_IMAGE_PIXELS = 1_000_000


def post(url: str, content: bytes | dict) -> httpx.Response:
    if isinstance(content, dict):
        return httpx.post(f"{url}/v1/chat/completions", json=content, timeout=60)
    return httpx.post(f"{url}/v1/chat/completions", content=content, timeout=60,
                      headers={"content-type": "application/json"})


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text[:400]
    error = response.json()["error"]
    assert error["code"] != "internal"
    return error["message"]


def text_body(**fields: object) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


def image_body(*pngs: bytes) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pngs]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "what?"}]}], "max_tokens": 2}


def grpc_chat(address: str, parts: list[gateway_pb2.ContentPart], **tiling: int) -> grpc.RpcError | list:
    request = gateway_pb2.ChatRequest(
        messages=[gateway_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=parts)],
        sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=2),
        tiling=common_pb2.TilingOptions(**tiling),
    )
    with grpc.insecure_channel(address, options=message_size_options()) as channel:
        try:
            return list(gateway_pb2_grpc.ChatStub(channel).Chat(request, timeout=60))
        except grpc.RpcError as error:
            return error


def image(data: bytes) -> gateway_pb2.ContentPart:
    return gateway_pb2.ContentPart(image=gateway_pb2.Image(data=data))


def text(value: str) -> gateway_pb2.ContentPart:
    return gateway_pb2.ContentPart(text=value)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"messages": [{"role": "user", "content": "ab\\ud800"}]}', "message 0 contains a lone surrogate (U+D800)"),
        (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
         "message 0 contains a lone surrogate (U+DFFF)"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["ok", "\\ud83d"]}', "'stop.1' contains"),
        (b'{"model": "\\udc00", "messages": [{"role": "user", "content": "hi"}]}', "'model' contains"),
    ],
    ids=["content", "text_part", "stop", "model"],
)
def test_lone_surrogates_are_refused_with_the_field_named(stack, raw, needle):
    message = error_of(post(stack.http_url, raw), 400)
    assert needle in message and "valid Unicode" in message, message
    # A proper pair (the same code point as UTF-8 or as an escaped pair) is fine.
    paired = post(stack.http_url, b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00 ok"}], "max_tokens": 2}')
    assert paired.status_code == 200, paired.text[:300]


def test_invalid_utf8_in_a_grpc_string_is_refused(stack):
    good = gateway_pb2.ChatRequest(
        messages=[gateway_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=[text("AAAA")])],
        sampling=common_pb2.SamplingParams(max_new_tokens=2),
    ).SerializeToString()
    bad = good.replace(b"AAAA", b"A\xed\xa0\x80")  # a UTF-8-encoded surrogate: not valid UTF-8
    with grpc.insecure_channel(stack.grpc_address) as channel:
        call = channel.unary_stream("/ivl.gateway.v1.Chat/Chat")
        with pytest.raises(grpc.RpcError) as caught:
            list(call(bad, timeout=30))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "not a valid ivl.gateway.v1.ChatRequest" in caught.value.details()
    assert "strings must be valid UTF-8" in caught.value.details()
    assert not isinstance(grpc_chat(stack.grpc_address, [text("\U0001f600 ok")]), grpc.RpcError)


@pytest.mark.parametrize(
    ("field", "value", "bounds"),
    [
        ("max_tokens", 2**31, "between 1 and 2147483647"),
        ("max_completion_tokens", 2**31, "between 1 and 2147483647"),
        ("max_tokens", 0, "between 1 and 2147483647"),
        ("top_k", 2**31, "between 0 and 2147483647"),
        ("top_k", -1, "between 0 and 2147483647"),
        ("seed", 2**64, "between 0 and 18446744073709551615"),
        ("seed", -1, "between 0 and 18446744073709551615"),
        ("max_tiles", 2**31, "between 1 and 40"),
        ("max_tiles", 100000, "between 1 and 40"),
        ("max_tiles", 0, "between 1 and 40"),
        ("min_tiles", 2**31, "between 1 and 40"),
    ],
)
def test_integers_out_of_range_are_refused_naming_the_field_and_range(stack, field, value, bounds):
    for body in (text_body(**{field: value}), {**image_body(new_png(40, 30)), field: value}):
        message = error_of(post(stack.http_url, body), 400)
        assert message == f"{field} is {value}; it must be {bounds}", message


def test_largest_valid_integers_are_accepted(stack):
    response = post(stack.http_url, text_body(seed=2**64 - 1, top_k=2**31 - 1, max_tiles=40, min_tiles=40))
    assert response.status_code == 200, response.text[:300]


def test_min_tiles_above_max_tiles_is_refused(stack):
    assert "min_tiles is 5; it must be between 1 and max_tiles (3)" in error_of(
        post(stack.http_url, text_body(max_tiles=3, min_tiles=5)), 400)


def test_tiling_options_are_checked_on_grpc_without_images(stack):
    for tiling, needle in (({"max_tiles": 100000}, "max_tiles is 100000"), ({"min_tiles": 41}, "min_tiles is 41"),
                           ({"max_tiles": 2, "min_tiles": 3}, "between 1 and max_tiles (2)")):
        result = grpc_chat(stack.grpc_address, [text("hi")], **tiling)
        assert isinstance(result, grpc.RpcError), tiling
        assert result.code() is grpc.StatusCode.INVALID_ARGUMENT and needle in result.details(), result.details()


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}",
         "nested too deeply"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "NaN is not a JSON number"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "Infinity is not a JSON number"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e999}', "out of range"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,', "not valid JSON"),
    ],
    ids=["nested_5000", "open_brackets_100000", "nan", "infinity", "float_overflow", "truncated"],
)
def test_unparsable_bodies_are_400(stack, raw, needle):
    assert needle in error_of(post(stack.http_url, raw), 400)


def test_a_bad_image_is_named_once_with_its_position(stack):
    bomb = png_bomb(50000, 50000, complete=False)
    message = error_of(post(stack.http_url, image_body(new_png(40, 30), bomb)), 413)
    assert message.startswith("image 1 (message 0): image is 50000x50000 = 2500.0 MP; the limit is"), message
    assert message.count("image 1") == 1 and "image 0" not in message
    result = grpc_chat(stack.grpc_address, [image(new_png(40, 30)), image(bomb), text("what?")])
    assert isinstance(result, grpc.RpcError) and result.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert result.details() == message
    single = error_of(post(stack.http_url, image_body(bomb)), 413)
    assert single.startswith("image 0 (message 0): image is 50000x50000"), single


def test_vision_errors_carry_their_code_in_trailing_metadata(stack):
    request = vision_pb2.PlanImagesRequest(images=[vision_pb2.ImageInput(data=png_bomb(50000, 50000, False))])
    with grpc.insecure_channel(stack.vision_addresses[0], options=message_size_options()) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            vision_pb2_grpc.VisionEncoderStub(channel).PlanImages(request, timeout=30)
        garbage = vision_pb2.PlanImagesRequest(images=[vision_pb2.ImageInput(data=b"not an image at all")])
        with pytest.raises(grpc.RpcError) as invalid:
            vision_pb2_grpc.VisionEncoderStub(channel).PlanImages(garbage, timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (ERROR_CODE_METADATA_KEY, "payload_too_large") in tuple(caught.value.trailing_metadata())
    assert from_grpc_error(caught.value, "vision").code is ErrorCode.PAYLOAD_TOO_LARGE
    assert from_grpc_error(invalid.value, "vision").code is ErrorCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def small_vision(tiny_original):
    """A vision service with small image limits (the gateway's own limits stay large)."""
    with running_stack(
        tiny_original, redis=False, gateway={"default_max_tiles": 2},
        vision={"max_image_bytes": SMALL_IMAGE_BYTES, "max_image_pixels": SMALL_IMAGE_PIXELS},
        llm={"context_length": 8192},
    ) as running:
        yield running


def test_an_image_over_the_vision_byte_limit_is_413_from_the_gateway(small_vision):
    big = png_padded_to(SMALL_IMAGE_BYTES + 1)
    message = error_of(post(small_vision.http_url, image_body(new_png(40, 30), big)), 413)
    assert message == (f"image 1 (message 0) is {SMALL_IMAGE_BYTES + 1} bytes; "
                       f"the limit is {SMALL_IMAGE_BYTES} bytes per image"), message
    result = grpc_chat(small_vision.grpc_address, [image(big), text("what?")])
    assert isinstance(result, grpc.RpcError) and result.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "the limit is 65536 bytes per image" in result.details()
    assert post(small_vision.http_url, image_body(png_padded_to(SMALL_IMAGE_BYTES))).status_code == 200


def test_an_image_over_the_vision_pixel_limit_is_413(small_vision):
    wide = new_png(1250, 1000)  # 1.25 MP: within the gateway's own limit (80 MP), over the vision service's
    message = error_of(post(small_vision.http_url, image_body(wide)), 413)
    assert message == "image 0 (message 0): image is 1250x1000 = 1.2 MP; the limit is 1.0 MP", message
    assert post(small_vision.http_url, image_body(new_png(1000, 1000))).status_code == 200
