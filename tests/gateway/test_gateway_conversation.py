"""Pure parts of a chat turn: validation, `<image>` placeholders, the tile budget, settings, auth, URLs."""

from __future__ import annotations

import base64
import http.server
import subprocess
import sys
import threading

import pytest
from ivl_gateway.auth import ApiKeys
from ivl_gateway.conversation import (
    ChatImage,
    ChatMessage,
    ChatTurn,
    TurnLimits,
    budget,
    collect_images,
    llm_messages,
    resolve_tiling,
    tiling_per_image,
)
from ivl_gateway.embedding_codec import TilingChoice
from ivl_gateway.image_fetch import ImageFetcher, decode_data_url
from ivl_gateway.openai_request import parse_request
from ivl_gateway.openai_turn import sampling_from_request, tiling_from_request
from ivl_gateway.settings import GatewaySettings
from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ErrorCode, ServingError

USER, ASSISTANT, SYSTEM = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT, common_pb2.ROLE_SYSTEM
LIMITS = TurnLimits(max_images=4, max_text_chars=1000)


def turn(*messages: ChatMessage) -> ChatTurn:
    return ChatTurn(list(messages), common_pb2.SamplingParams(), common_pb2.TilingOptions())


def test_placeholders_single_and_several_images():
    one = turn(ChatMessage(USER, ["what is this?", b"img"]))
    assert [m.content for m in llm_messages(one, 1)] == ["<image>\nwhat is this?"]
    several = turn(
        ChatMessage(SYSTEM, ["be brief"]),
        ChatMessage(USER, [b"a", b"b", "compare"]),
        ChatMessage(ASSISTANT, ["they differ"]),
        ChatMessage(USER, ["and this?", b"c"]),
    )
    images = collect_images(several, LIMITS)
    assert [(i.message_index, i.image_index) for i in images] == [(1, 0), (1, 1), (3, 2)]
    contents = [m.content for m in llm_messages(several, len(images))]
    assert contents == [
        "be brief",
        "Image-1: <image>\nImage-2: <image>\ncompare",
        "they differ",
        "Image-3: <image>\nand this?",
    ]


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([], "messages is empty"),
        ([ChatMessage(ASSISTANT, ["hi"])], "last message must be a user"),
        ([ChatMessage(USER, ["look <image> here"])], "reserved placeholder"),
        ([ChatMessage(ASSISTANT, [b"x"]), ChatMessage(USER, ["q"])], "only allowed in user"),
        ([ChatMessage(USER, [b"1", b"2", b"3", b"4", b"5"])], "limit is 4 images"),
        ([ChatMessage(USER, ["x" * 1001])], "limit is 1000"),
        ([ChatMessage(USER, [b""])], "empty"),
        ([ChatMessage(USER, ["a"]), ChatMessage(SYSTEM, ["b"]), ChatMessage(USER, ["c"])], "only allowed first"),
    ],
)
def test_bad_conversations_are_rejected_with_a_reason(messages, needle):
    with pytest.raises(ServingError, match=needle) as info:
        collect_images(turn(*messages), LIMITS)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


def test_tiling_options_and_budget_rule():
    defaults = TilingChoice(12, 1, True)
    assert resolve_tiling(common_pb2.TilingOptions(), defaults, 40) == defaults
    assert resolve_tiling(common_pb2.TilingOptions(max_tiles=40, use_thumbnail=False), defaults, 40) == TilingChoice(
        40, 1, False
    )
    for bad in (0, 41):
        with pytest.raises(ServingError, match="between 1 and 40"):
            resolve_tiling(common_pb2.TilingOptions(max_tiles=bad), defaults, 40)
    with pytest.raises(ServingError, match="min_tiles"):
        resolve_tiling(common_pb2.TilingOptions(max_tiles=4, min_tiles=5), defaults, 40)
    assert budget(TilingChoice(12, 1, True), 5) == TilingChoice(2, 1, True)
    assert budget(TilingChoice(3, 2, True), 5) == TilingChoice(1, 1, True)
    images = [ChatImage(b"a", 0, 0), ChatImage(b"b", 2, 1), ChatImage(b"c", 2, 2), ChatImage(b"d", 2, 3)]
    remembered = [TilingChoice(12, 1, True), None, None, None]
    choices = tiling_per_image(images, TilingChoice(12, 1, True), remembered, latest=2)
    assert choices == [TilingChoice(12, 1, True)] + [TilingChoice(4, 1, True)] * 3
    # an earlier image without a memory gets the rule applied to its own message
    assert tiling_per_image(images[:1], TilingChoice(12, 1, True), [None], latest=2) == [TilingChoice(12, 1, True)]


def test_settings_lists_from_env(monkeypatch):
    monkeypatch.setenv("IVL_GATEWAY_VISION_ADDRESSES", "a:1, b:2")
    monkeypatch.setenv("IVL_GATEWAY_API_KEYS", "k1,k2")
    settings = GatewaySettings()
    assert settings.vision_addresses == ["a:1", "b:2"] and settings.api_keys == ["k1", "k2"]
    assert settings.redis_url == "" and settings.allow_url_fetch is False


def test_api_keys():
    ApiKeys([]).check(None)
    keys = ApiKeys(["s3cret"])
    keys.check(ApiKeys.from_authorization("Bearer s3cret"))
    for presented in (None, "wrong"):
        with pytest.raises(ServingError) as info:
            keys.check(presented)
        assert info.value.code is ErrorCode.UNAUTHENTICATED


def test_openai_request_parsing():
    body = parse_request({
        "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 5, "temperature": 0, "stop": "x", "max_tiles": 3, "use_thumbnail": False,
    })
    sampling = sampling_from_request(body)
    assert sampling.max_new_tokens == 5 and list(sampling.stop) == ["x"]
    assert tiling_from_request(body).max_tiles == 3 and tiling_from_request(body).use_thumbnail is False
    with pytest.raises(ServingError, match="messages"):
        parse_request({"messages": "nope"})
    assert sampling_from_request(parse_request({"messages": [], "n": 2, "temperature": 1})).n == 2
    with pytest.raises(ServingError, match="n is 200; it must be between 1 and 128"):
        parse_request({"messages": [], "n": 200})


def test_data_urls():
    assert decode_data_url("data:image/png;base64," + base64.b64encode(b"abc").decode(), 100) == b"abc"
    with pytest.raises(ServingError, match="limit is 2 bytes") as info:
        decode_data_url("data:image/png;base64," + base64.b64encode(b"abc").decode(), 2)
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    with pytest.raises(ServingError, match="no bytes"):
        decode_data_url("data:image/png;base64,", 100)


@pytest.fixture
def image_http_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/img")
                self.end_headers()
                return
            body = b"\x89PNG" + b"x" * (5000 if self.path == "/big" else 10)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


async def test_url_fetching_off_by_default_then_guarded(image_http_server):
    url = f"{image_http_server}/img"
    with pytest.raises(ServingError, match="disabled"):
        await ImageFetcher(GatewaySettings()).load(url)
    enabled = {"allow_url_fetch": True, "url_allowed_hosts": ["127.0.0.1"]}
    with pytest.raises(ServingError, match="non-public address"):
        await ImageFetcher(GatewaySettings(**enabled)).load(url)
    with pytest.raises(ServingError, match="allow-list"):
        await ImageFetcher(GatewaySettings(allow_url_fetch=True, url_allowed_hosts=["example.com"])).load(url)
    open_fetcher = ImageFetcher(GatewaySettings(**enabled, allow_private_urls=True, url_max_bytes=1000))
    assert (await open_fetcher.load(url)).startswith(b"\x89PNG")
    assert (await open_fetcher.load(f"{image_http_server}/redirect")).startswith(b"\x89PNG")
    with pytest.raises(ServingError, match="limit is 1000 bytes"):
        await open_fetcher.load(f"{image_http_server}/big")
    with pytest.raises(ServingError, match="not supported"):
        await open_fetcher.load("file:///etc/passwd")


def test_gateway_never_imports_torch():
    code = ("import sys, ivl_gateway.server, ivl_gateway.__main__; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


async def test_dns_targets_resolve_to_one_replica_per_address():
    from ivl_gateway.replica_targets import parse_target, resolve

    assert await resolve(parse_target("10.0.0.1:5")) == ["10.0.0.1:5"]
    assert "127.0.0.1:50051" in await resolve(parse_target("dns:localhost:50051"))
    assert "127.0.0.1:50051" in await resolve(parse_target("dns:///localhost:50051"))
    assert await resolve(parse_target("dns:no-such-host.invalid:1")) == []
