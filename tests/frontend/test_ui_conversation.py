"""The pure parts of the UI: Gradio history -> gateway request, tile-grid previews, reply stats."""

from __future__ import annotations

from pathlib import Path

import pytest
from ivl_frontend.conversation import Controls, build_request, history_turns, message_turn
from ivl_frontend.reply_stats import ReplyStats
from ivl_frontend.settings import FrontendSettings
from ivl_frontend.tile_preview import draw_grid, plan_caption
from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.gateway.v1 import gateway_pb2
from PIL import Image


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, size in enumerate([(900, 500), (300, 600)]):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", size, (40 * i, 100, 200)).save(path)
        paths.append(str(path))
    return paths


def test_history_in_every_gradio_shape_keeps_images_and_skips_stats_notes(images):
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": images[0]}}, {"type": "text", "text": "what?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a picture"}]},
        {"role": "assistant", "content": "📊 stats", "metadata": {"title": "📊 cache hit"}},
        {"role": "user", "content": {"path": images[1]}},
        {"role": "user", "content": "and this one?"},
        {"role": "assistant", "content": "another\n\n⚠️ **Error (unavailable):** the gateway is down"},
        {"role": "user", "content": "retry"},
        {"role": "assistant", "content": "⚠️ **Error (invalid_argument):** bad image"},
    ]
    turns = history_turns(history)
    assert [(t.role, t.text, t.images) for t in turns] == [
        ("user", "what?", [images[0]]),
        ("assistant", "a picture", []),
        ("user", "and this one?", [images[1]]),
        ("assistant", "another", []),
        ("user", "retry", []),
        ("assistant", "", []),
    ]


def test_request_drops_empty_turns_and_merges_neighbours_of_one_role(images):
    turns = history_turns([
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "⚠️ **Error (unavailable):** the gateway is down"},
    ])
    turns.append(message_turn({"text": "second", "files": [images[0]]}, max_images=4))
    request = build_request(turns, Controls(), "r")
    (only,) = request.messages
    assert [p.WhichOneof("part") for p in only.content] == ["image", "text"]
    assert only.content[1].text == "first\nsecond"


def test_request_resends_every_image_with_sampling_tiling_and_system_prompt(images):
    turns = history_turns([{"role": "user", "content": [{"path": images[0]}, "first"]},
                           {"role": "assistant", "content": "ok"}])
    turns.append(message_turn({"text": "compare", "files": [images[1], {"path": images[0]}]}, max_images=4))
    controls = Controls(system_prompt="Be brief.", temperature=0.7, top_p=0.9, max_new_tokens=33,
                        max_tiles=6, use_thumbnail=False)
    request = build_request(turns, controls, request_id="r1")
    roles = [m.role for m in request.messages]
    assert roles == [common_pb2.ROLE_SYSTEM, common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT, common_pb2.ROLE_USER]
    last = request.messages[-1].content
    assert [p.WhichOneof("part") for p in last] == ["image", "image", "text"]
    assert last[0].image.data == Path(images[1]).read_bytes()
    assert last[2].text == "compare"
    assert request.messages[1].content[0].image.data == Path(images[0]).read_bytes()
    assert request.sampling.max_new_tokens == 33 and request.sampling.top_p == pytest.approx(0.9)
    assert request.sampling.temperature == pytest.approx(0.7)
    assert request.tiling.max_tiles == 6 and request.tiling.use_thumbnail is False
    assert request.request_id == "r1"


def test_bad_messages_get_errors_a_person_can_act_on(tmp_path, images):
    with pytest.raises(ServingError, match="empty") as empty:
        message_turn({"text": "  ", "files": []}, max_images=4)
    assert empty.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(ServingError, match="3 images in one message; the limit is 2"):
        message_turn({"text": "x", "files": images + images[:1]}, max_images=2)
    doc = tmp_path / "notes.pdf"
    doc.write_bytes(b"%PDF")
    with pytest.raises(ServingError, match=r"notes\.pdf is not an image"):
        message_turn({"text": "x", "files": [str(doc)]}, max_images=2)
    gone = message_turn({"text": "x", "files": [str(tmp_path / "gone.png")]}, max_images=2)
    with pytest.raises(ServingError, match="no longer available") as missing:
        build_request([gone], Controls(), "r")
    assert missing.value.code is ErrorCode.NOT_FOUND


def test_grid_preview_draws_tile_boundaries_and_caption_counts_tokens():
    plan = common_pb2.ImagePlan(grid_cols=3, grid_rows=2, num_tiles=7, resize_width=1344, resize_height=896,
                                original_width=900, original_height=600, has_thumbnail=True, num_tokens=1792)
    picture = draw_grid(Image.new("RGB", (900, 600), (0, 0, 255)), plan, max_side=300)
    assert picture.size == (300, 200)
    # Vertical lines at 1/3 and 2/3 of the width, a horizontal one at half the height, in the grid colour.
    assert picture.getpixel((100, 150))[0] > 200 and picture.getpixel((200, 150))[0] > 200
    assert picture.getpixel((150, 100))[0] > 200
    assert picture.getpixel((150, 150)) == (0, 0, 255)  # inside a tile: untouched
    assert plan_caption(plan, 1) == (
        "image 1: 3×2 grid = 6 tiles + thumbnail = 7 tiles · 1792 visual tokens · 900×600 → 1344×896"
    )


def test_reply_stats_say_cache_hit_ttft_and_tokens_per_second():
    final = gateway_pb2.Final(images=2, cache_hits=2, usage=common_pb2.Usage(decode_tokens_per_s=12.34,
                                                                            completion_tokens=5))
    stats = ReplyStats(ttft_s=0.4567, final=final)
    assert stats.title() == "cache hit (2/2 images) · TTFT 0.46 s · 12.3 tokens/s"
    assert "completion tokens 5" in stats.details()
    reused = gateway_pb2.Final(usage=common_pb2.Usage(prompt_tokens=900, cached_prompt_tokens=850, prefill_s=0.4321))
    details = ReplyStats(final=reused).details()
    assert "prompt tokens 900 (850 reused from earlier turns)" in details and "LLM prefill 432 ms" in details
    assert "cache miss (0/1" in ReplyStats(final=gateway_pb2.Final(images=1)).title()
    assert "partial hit (1/2" in ReplyStats(final=gateway_pb2.Final(images=2, cache_hits=1)).title()


def test_settings_validate_auth_and_read_the_env(monkeypatch):
    monkeypatch.setenv("IVL_FRONTEND_AUTH", "ann:secret,bob:pw")
    monkeypatch.setenv("IVL_FRONTEND_PORT", "7999")
    settings = FrontendSettings()
    assert settings.auth_pairs() == [("ann", "secret"), ("bob", "pw")] and settings.port == 7999
    with pytest.raises(ValueError, match="user:password"):
        FrontendSettings(auth="nopassword")
    with pytest.raises(ValueError):
        FrontendSettings(max_tiles=41)
