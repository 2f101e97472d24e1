"""Hostile inputs through the whole stack (OpenAI HTTP API and gRPC Chat): a clear 4xx/INVALID_ARGUMENT
for every bad one, a normal answer for every odd-but-valid one, and after each: no service died
(health SERVING, /ready 200) and memory stays bounded.

The image corpus is tests/support/hostile_images.py (zero bytes, truncated JPEG/PNG, a text file named
.png, SVG, decompression bombs, 1x1 and 1x20000, CMYK, 16-bit, palette+transparency, animated GIF/WebP,
...); the request-level corpus (invalid base64 and data URLs, wrong content types, 100 images, a 10 MB
prompt, unicode edge cases, broken JSON) is built here. The stack runs in this process (real gRPC
servers, real redis-server); a mismatched pair of checkpoints (LLM hidden size != vision width) gets
its own LLM server and gateway.
"""

from __future__ import annotations

import base64
import json

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ERROR_TABLE, ErrorCode
from ivl_proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ivl_proto.grpc_runtime import message_size_options
from support.hostile_images import hostile_corpus
from support.llm_server import llm_server_in_thread
from support.load_client import chat_body, data_url, unique_png
from support.service_processes import rss_bytes
from support.stack import running_stack

pytestmark = pytest.mark.slow

IMAGE_BYTES_LIMIT = 2 * 2**20
CORPUS = hostile_corpus(max_bytes=IMAGE_BYTES_LIMIT)
RSS_GROWTH_LIMIT = 300 * 2**20  # the whole corpus, both APIs: far below one decoded bomb (2500 MP)
PNG = unique_png(1, 64, 48)


@pytest.fixture(scope="module")
def stack(tiny_original):
    with running_stack(
        tiny_original,
        gateway={"default_max_tiles": 2},
        vision={"max_image_bytes": IMAGE_BYTES_LIMIT},
        llm={"context_length": 8192, "max_concurrency": 2},
    ) as running:
        yield running


@pytest.fixture(scope="module")
def memory(stack):
    """RSS of the process holding the stack, after a warm-up chat; checked by the last test."""
    post(stack, chat_body("warm up", [PNG], stream=False, max_tokens=2))
    return {"before": rss_bytes(_pid())}


def _pid() -> int:
    import os

    return os.getpid()


def post(stack, body: object, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    headers = kwargs.pop("headers", {"content-type": "application/json"})
    return httpx.post(f"{stack.http_url}/v1/chat/completions", content=content, headers=headers, timeout=120,
                      **kwargs)


def assert_clear_refusal(response: httpx.Response, status: int | tuple[int, ...], needle: str = "") -> None:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, response.text[:500]
    error = response.json()["error"]
    assert error["code"] in {c.value for c in ErrorCode} and error["code"] != "internal"
    assert len(error["message"]) > 10
    assert needle.lower() in error["message"].lower(), error["message"]


def assert_all_alive(stack) -> None:
    for address in stack.vision_addresses + stack.llm_addresses:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, address
    ready = httpx.get(f"{stack.http_url}/ready", timeout=30)
    assert ready.status_code == 200, ready.text


def image_part_body(url: str, stream: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "what is it?"}]}],
            "max_tokens": 2, "temperature": 0, "stream": stream}


@pytest.mark.parametrize("item", CORPUS, ids=[item.name for item in CORPUS])
def test_image_corpus_over_http(stack, memory, item):
    response = post(stack, image_part_body(data_url(item.data)))
    if item.ok:
        assert response.status_code == 200, response.text[:500]
        plan = response.json()["ivl"]["images"][0]["plan"]
        assert (plan["original_width"], plan["original_height"]) == item.expected_size
    else:
        # 413 for a payload that is too large (the vision service's ErrorCode travels in gRPC trailing
        # metadata, and the gateway checks the vision byte limit itself), 400 for the rest.
        status = ERROR_TABLE[item.expected_code].http_status
        assert_clear_refusal(response, status, item.message_part if item.data else "no bytes")
    assert_all_alive(stack)


def grpc_chat(stack, parts: list[gateway_pb2.ContentPart], **request_fields) -> grpc.RpcError | list:
    request = gateway_pb2.ChatRequest(
        messages=[gateway_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=parts)],
        sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=2), **request_fields,
    )
    with grpc.insecure_channel(stack.grpc_address, options=message_size_options()) as channel:
        try:
            return list(gateway_pb2_grpc.ChatStub(channel).Chat(request, timeout=120))
        except grpc.RpcError as error:
            return error


def image_part(data: bytes) -> gateway_pb2.ContentPart:
    return gateway_pb2.ContentPart(image=gateway_pb2.Image(data=data))


def text_part(text: str) -> gateway_pb2.ContentPart:
    return gateway_pb2.ContentPart(text=text)


def test_image_corpus_over_grpc(stack, memory):
    for item in CORPUS:
        result = grpc_chat(stack, [image_part(item.data), text_part("what is it?")])
        if item.ok:
            assert not isinstance(result, grpc.RpcError), f"{item.name}: {result}"
            assert result[-1].HasField("final"), item.name
        else:
            assert isinstance(result, grpc.RpcError), item.name
            assert result.code() is grpc.StatusCode.INVALID_ARGUMENT, f"{item.name}: {result.code()}"
            assert item.message_part.lower() in result.details().lower(), f"{item.name}: {result.details()}"
    assert_all_alive(stack)


PNG_B64 = base64.b64encode(PNG).decode()
BAD_URLS = [
    ("not_base64", "data:image/png;base64,@@@@not*base64@@", "base64"),
    ("base64_of_nothing", "data:image/png;base64,", "no bytes"),
    ("no_comma", "data:image/png;base64" + PNG_B64[:40], "','"),
    ("base64_truncated_mid_symbol", "data:image/png;base64," + PNG_B64[:-3], ""),
    ("percent_encoded_text", "data:image/png,hello%20world", "decode"),
    ("text_mime_text_body", "data:text/plain;base64," + base64.b64encode(b"just some words").decode(), "decode"),
    ("file_scheme", "file:///etc/passwd", "not supported"),
    ("ftp_scheme", "ftp://example.com/a.png", "not supported"),
    ("http_fetch_disabled", "http://127.0.0.1:1/a.png", "disabled"),
    ("empty_url", "", "not supported"),
    ("javascript", "javascript:alert(1)", "not supported"),
]


@pytest.mark.parametrize(("url", "needle"), [(u, n) for _, u, n in BAD_URLS], ids=[i for i, _, _ in BAD_URLS])
def test_invalid_base64_and_data_urls(stack, memory, url, needle):
    assert_clear_refusal(post(stack, image_part_body(url)), 400, needle)
    assert_clear_refusal(post(stack, image_part_body(url, stream=True)), 400, needle)  # before any stream


def test_content_is_sniffed_not_trusted_from_the_mime_type(stack, memory):
    # A real PNG labelled as JPEG or as text is still that PNG; the label never decides the decoder.
    for mime in ("image/jpeg", "text/plain", "application/octet-stream"):
        response = post(stack, image_part_body(data_url(PNG, mime)))
        assert response.status_code == 200, (mime, response.text[:300])


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"messages=hello&model=x", "application/x-www-form-urlencoded"),
        (b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b"),
        (PNG, "image/png"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "text/plain"),
    ],
    ids=["form", "multipart", "raw_png", "json_as_text_plain"],
)
def test_bodies_that_are_not_json_are_415(stack, memory, content, content_type):
    assert_clear_refusal(post(stack, content, headers={"content-type": content_type}), 415, "application/json")


@pytest.mark.parametrize(
    ("content", "content_type", "needle"),
    [
        (b"", "application/json", "not valid JSON"),
        (b"\xff\xfe\x00{", "application/json", "not valid JSON"),
        (b"[1, 2, 3]", "application/json", "must be a JSON object"),
        (b"\"just a string\"", "application/json", "must be a JSON object"),
        (b"{\"messages\": \"hello\"}", "application/json", "messages"),
        (b"{\"messages\": []}", "application/json", "empty"),
        (b"{\"messages\": [{\"role\": \"robot\", \"content\": \"hi\"}]}", "application/json", "role"),
        (b"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"video\"}]}]}", "application/json",
         "message 0, part 0: type 'video' is not supported"),
        (b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": -5}", "application/json",
         "max_tokens"),
        (json.dumps({**chat_body("hi", [PNG], stream=False), "max_tiles": 100000}).encode(), "application/json",
         "max_tiles is 100000"),
        (b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"n\": 300}", "application/json", "n is 300"),
        (b"{" * 100_000, "application/json", "not valid JSON"),
    ],
    ids=["empty_body", "bad_utf8", "json_list", "json_string", "messages_str",
         "no_messages", "bad_role", "bad_part_type", "negative_max_tokens", "max_tiles_huge", "n_300", "many_open_braces"],
)
def test_wrong_content_types_and_malformed_bodies(stack, memory, content, content_type, needle):
    assert_clear_refusal(post(stack, content, headers={"content-type": content_type}), 400, needle)


def test_one_hundred_images_in_one_request(stack, memory):
    images = [unique_png(200 + i, 16, 16) for i in range(100)]
    body = chat_body("describe them all", images, stream=False)
    assert_clear_refusal(post(stack, body), 400, "100 images; the limit is")
    error = grpc_chat(stack, [*(image_part(i) for i in images), text_part("all of them")])
    assert isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "100 images" in error.details()
    assert_all_alive(stack)


def test_a_ten_megabyte_prompt(stack, memory):
    prompt = "lorem ipsum " * (10 * 2**20 // 12)
    assert_clear_refusal(post(stack, chat_body(prompt, stream=False)), 400, "characters of text; the limit is")
    error = grpc_chat(stack, [text_part(prompt)])
    assert isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "characters of text" in error.details()


def test_a_body_over_the_request_size_limit(stack, memory):
    limit = stack.gateway.settings.max_request_bytes
    response = post(stack, b" " * (limit + 1))
    assert_clear_refusal(response, 413, "max_request_bytes")


UNICODE_OK = {
    "rtl_arabic_hebrew": "ما هذا؟ מה זה? \u202eevil\u202c",
    "emoji_zwj": "👩‍👩‍👧‍👦 🏳️‍🌈 🇺🇦 👍🏽",
    "nul_and_controls": "a\x00b\x01c\x1bd\x7f",
    "combining_marks": "Z̴̡̢̛͍͇̜a̸̢l̵go" * 50,
    "bom_zero_width": "\ufeff\u200b\u200c\u200d\u2060text",
    "non_bmp_cjk": "𠀀𠀁 漢字 かな 한글",
    "private_use_and_nonchar": "\ue000\uffff\U0010ffff",
}


@pytest.mark.parametrize("text", UNICODE_OK.values(), ids=UNICODE_OK.keys())
def test_unicode_edge_cases_are_answered(stack, memory, text):
    response = post(stack, chat_body(text, [PNG], stream=False, max_tokens=3))
    assert response.status_code == 200, response.text[:300]
    json.dumps(response.json(), ensure_ascii=False).encode("utf-8")  # the reply is valid UTF-8 JSON
    result = grpc_chat(stack, [text_part(text)])
    assert not isinstance(result, grpc.RpcError), result


@pytest.mark.parametrize("escape", ["\\ud800", "\\udfff", "abc\\udc00def", "\\ud83d"])
def test_lone_surrogates_via_json_escapes(stack, memory, escape):
    raw = ('{"messages": [{"role": "user", "content": "' + escape + '"}], "max_tokens": 2}').encode()
    response = post(stack, raw)
    # Either refused as invalid text or answered with the surrogate replaced; never a 500.
    if response.status_code not in (200, 400):
        pytest.fail(f"HTTP {response.status_code}: {response.text[:200]}", pytrace=False)
    if response.status_code == 400:
        assert_clear_refusal(response, 400)
    assert_all_alive(stack)


@pytest.mark.parametrize("field", ["max_tokens", "top_k", "max_tiles"])
def test_out_of_range_integers_over_http(stack, memory, field):
    response = post(stack, {**chat_body("hi", [PNG], stream=False), field: 2**31})
    if response.status_code != 400:
        pytest.fail(f"HTTP {response.status_code}: {response.text[:200]}", pytrace=False)
    assert_clear_refusal(response, 400, field)
    assert_all_alive(stack)


@pytest.mark.parametrize("depth", [100_000, 5_000])
def test_deeply_nested_json(stack, memory, depth):
    response = post(stack, b'{"messages": [{"role": "user", "content": "hi"}], "stop": ' + b"[" * depth
                    + b"]" * depth + b"}")
    if response.status_code != 400:
        pytest.fail(f"HTTP {response.status_code}: {response.text[:200]}", pytrace=False)
    assert_all_alive(stack)


def test_memory_stays_bounded_and_everything_is_alive(stack, memory):
    assert_all_alive(stack)
    growth = rss_bytes(_pid()) - memory["before"]
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.0f} MiB over the hostile corpus"


def test_wrong_hidden_size_is_reported_and_refused(stack, tiny_ckpt_factory):
    other = tiny_ckpt_factory(llm_hidden=96)  # vision width stays 64 (tiny_original's LLM hidden size)
    with llm_server_in_thread(other, warmup=False) as (llm_address, _), stack.extra_gateway(
        llm_addresses=[llm_address]
    ) as gateway:
        url = f"http://127.0.0.1:{gateway.ports.http}"
        ready = httpx.get(f"{url}/ready", timeout=30)
        assert ready.status_code == 503
        assert "96" in str(ready.json()["compatible"]) and "64" in str(ready.json()["compatible"])
        response = httpx.post(f"{url}/v1/chat/completions", json=chat_body("hi", [PNG], stream=False), timeout=60)
        assert_clear_refusal(response, 409, "different models")
        with grpc.insecure_channel(f"127.0.0.1:{gateway.ports.grpc}", options=message_size_options()) as channel:
            request = gateway_pb2.ChatRequest(messages=[gateway_pb2.ChatMessage(
                role=common_pb2.ROLE_USER, content=[image_part(PNG), text_part("hi")])])
            with pytest.raises(grpc.RpcError) as caught:
                list(gateway_pb2_grpc.ChatStub(channel).Chat(request, timeout=60))
            assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert_all_alive(stack)
