"""Tile previews made safely: render_preview refuses from the header, PreviewPool keeps renders off
the event loop (bounded, timed out), PreviewStore deletes the files; and the history after a reply
(refused images out, stopped replies marked)."""

from __future__ import annotations

import asyncio
import io
import os
import time

import numpy as np
import pytest
from ivl_frontend.chat_handler import refused_path
from ivl_frontend.conversation import RefusedFile, history_turns
from ivl_frontend.history_cleanup import RefusedImages, settle, settle_in_place
from ivl_frontend.preview_pool import PreviewPool, PreviewUnavailable, RenderLimits
from ivl_frontend.preview_render import PreviewRefused, count_jpeg_scans, render_preview
from ivl_frontend.preview_store import PreviewStore
from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ErrorCode, ServingError
from PIL import Image
from support.hostile_images import png_bomb, progressive_jpeg_bomb

PLAN = common_pb2.ImagePlan(grid_cols=2, grid_rows=1, num_tiles=3, has_thumbnail=True)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def test_render_preview_draws_the_grid_on_a_reduced_picture():
    png = render_preview(_encode(Image.new("RGB", (1600, 800), (0, 0, 255)), "PNG"), PLAN, max_side=400)
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.size == (400, 200)
    assert picture.getpixel((200, 100))[0] > 200  # the vertical grid line at half the width
    assert picture.getpixel((100, 100)) == (0, 0, 255)
    # A JPEG is decoded at a reduced DCT scale (draft) and gives the same kind of picture.
    jpeg = render_preview(_encode(Image.new("RGB", (4000, 2000), (0, 0, 255)), "JPEG"), PLAN, max_side=400)
    assert Image.open(io.BytesIO(jpeg)).size == (400, 200)
    # 16-bit greys are scaled to 8 bits, not clipped to white.
    wide = Image.fromarray(np.full((100, 200), 30000, dtype=np.uint16))
    grey = Image.open(io.BytesIO(render_preview(_encode(wide, "PNG"), PLAN, max_side=200))).getpixel((20, 50))
    assert 200 < grey[0] <= 255 and grey[0] == grey[1] == grey[2]


def test_render_preview_refuses_from_the_header_before_decoding():
    started = time.perf_counter()
    with pytest.raises(PreviewRefused, match="previews stop at 80 MP"):
        render_preview(png_bomb(10_000, 9_000, complete=False), PLAN)  # 90 MP claimed in 1 KB
    with pytest.raises(PreviewRefused, match="not an image"):
        render_preview(b"this is not an image", PLAN)
    with pytest.raises(PreviewRefused, match="could not be decoded"):
        render_preview(_encode(Image.new("RGB", (300, 200)), "PNG")[:200], PLAN)  # truncated
    bomb = progressive_jpeg_bomb(2048, 2048, 4000)
    assert len(bomb) < 200_000 and count_jpeg_scans(bomb) > 4000
    with pytest.raises(PreviewRefused, match="4010 scans"):
        render_preview(bomb, PLAN)
    assert time.perf_counter() - started < 5  # nothing above was decoded (the bomb alone takes ~30 s)


def test_the_scan_bomb_really_is_slow_to_decode():
    """The test image is what it claims: the repeated scans, not the size, cost the decode time."""

    def decode_s(data: bytes) -> float:
        started = time.perf_counter()
        Image.open(io.BytesIO(data)).load()
        return time.perf_counter() - started

    plain, bomb = progressive_jpeg_bomb(2048, 2048, 0), progressive_jpeg_bomb(2048, 2048, 300)
    assert count_jpeg_scans(plain) == 10 and len(bomb) < 2 * len(plain)
    plain_s, bomb_s = min(decode_s(plain) for _ in range(3)), decode_s(bomb)
    assert bomb_s > 5 * plain_s, (plain_s, bomb_s)


async def test_pool_bounds_renders_per_chat_shares_them_and_gives_up_after_its_timeout():
    release = asyncio.Event()
    calls: list[bytes] = []

    async def slow_render(data: bytes, plan: common_pb2.ImagePlan) -> bytes:
        calls.append(data)
        await release.wait()
        return b"png:" + data

    pool = PreviewPool(workers=2, timeout_s=0.5, render=slow_render)
    # Two chats' renders hang; the same picture asked for twice is rendered once, and a render given up at
    # its timeout is cancelled (in the sandbox: its worker killed), so its slot is free again at once.
    results = await asyncio.gather(
        pool.render(b"x", PLAN, key="x", owner="chat-1"), pool.render(b"x", PLAN, key="x", owner="chat-2"),
        pool.render(b"w", PLAN, key="w", owner="chat-2"), return_exceptions=True,
    )
    assert all(isinstance(r, PreviewUnavailable) and "longer than 0.5 s" in str(r) for r in results), results
    assert calls == [b"x", b"w"]
    await asyncio.sleep(0)
    assert pool.running == 0 and pool._owners == {} and pool._jobs == {}
    assert pool.given_up == 3
    # One chat has at most half the slots: its second render waits for its first; another chat's goes at once.
    release.clear()
    pool = PreviewPool(workers=2, timeout_s=5.0, render=slow_render)
    first = asyncio.ensure_future(pool.render(b"a", PLAN, key="a", owner="chat-1"))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(pool.render(b"b", PLAN, key="b", owner="chat-1"))
    other = asyncio.ensure_future(pool.render(b"z", PLAN, key="z", owner="chat-3"))
    await asyncio.sleep(0.3)
    assert calls[-2:] == [b"a", b"z"] and not second.done()
    release.set()
    assert await asyncio.gather(first, second, other) == [b"png:a", b"png:b", b"png:z"]
    assert calls[-1] == b"b" and pool.running == 0 and pool._owners == {}


async def test_sandboxed_render_of_a_decode_bomb_is_killed_at_its_timeout():
    """A bomb under the scan limit really decodes for tens of seconds: the worker is killed at the timeout,
    the event loop never waits, and the next preview is rendered by a fresh worker."""
    bomb = progressive_jpeg_bomb(4000, 4000, 400)  # ~8 s of decoding on an idle core: far past 1 s anywhere
    pool = PreviewPool(workers=1, timeout_s=1.0, limits=RenderLimits(max_jpeg_scans=1000))
    try:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.05)

        ticker = asyncio.ensure_future(tick())
        started = time.monotonic()
        with pytest.raises(PreviewUnavailable, match="longer than 1 s"):
            await pool.render(bomb, PLAN, key="bomb", owner="chat-1")
        waited = time.monotonic() - started
        ticker.cancel()
        assert waited < 15 and ticks >= 5  # the loop kept running while the bomb decoded elsewhere
        sandbox = pool.sandbox
        assert sandbox is not None
        stats = sandbox.pool.stats
        for _ in range(100):  # the cancelled render kills its worker as soon as it runs again
            if stats.cancel_kills + stats.cpu_kills + stats.wall_kills:
                break
            await asyncio.sleep(0.02)
        assert stats.cancel_kills + stats.cpu_kills + stats.wall_kills == 1
        for _ in range(600):  # a fresh worker takes the killed one's place (seconds on a loaded machine)
            if sandbox.pool.stats.starts == 2 and sandbox.pool.busy == 0:
                break
            await asyncio.sleep(0.05)
        png = await pool.render(_encode(Image.new("RGB", (64, 48)), "PNG"), PLAN, key="ok", owner="chat-1")
        assert png.startswith(b"\x89PNG")
    finally:
        pool.close()


async def test_pool_passes_refusals_through():
    pool = PreviewPool(workers=1, timeout_s=5)
    try:
        with pytest.raises(PreviewRefused):
            await pool.render(b"garbage", PLAN)
        assert pool.running == 0
    finally:
        pool.close()


def test_store_deletes_a_chats_files_when_cleared_shared_ones_last_all_after_ttl_and_at_close(tmp_path):
    now = [1000.0]
    store = PreviewStore(tmp_path, ttl_s=600, clock=lambda: now[0])
    a = store.put("a", b"png-a", "session-1")
    shared = store.put("s", b"png-s", "session-1")
    assert store.get("s", "session-2") == shared
    assert store.release("session-1") == 1  # a goes, s is still shown by session-2
    assert not os.path.exists(a) and os.path.exists(shared)
    assert store.get("a", "session-1") is None
    assert store.release("session-2") == 1 and not os.path.exists(shared)
    old = store.put("old", b"png", "session-3")
    now[0] += 601
    assert store.get("old", "session-3") is None and not os.path.exists(old)  # the TTL sweep ran
    store.put("b", b"png", "session-4")
    folder = store.folder
    store.close()
    assert not folder.exists()


def test_store_removes_folders_left_by_a_killed_ui(tmp_path):
    dead = tmp_path / "ivl-ui-previews-999999999-abc"
    dead.mkdir()
    (dead / "tiles-x.png").write_bytes(b"png")
    mine = PreviewStore(tmp_path, ttl_s=60)
    assert not dead.exists() and mine.folder.exists()
    mine.close()


def test_refused_path_names_the_image_of_gateway_and_ui_errors():
    paths = ["/u/a.png", "/u/b.png", "/u/c.png"]
    invalid = ErrorCode.INVALID_ARGUMENT
    assert refused_path(ServingError(invalid, "image 1 (message 2): cannot identify image file"), paths) == paths[1]
    too_big = ServingError(ErrorCode.PAYLOAD_TOO_LARGE, "image 2 is 9000x9000 = 81.0 MP; the limit is 80.0 MP per image")
    assert refused_path(too_big, paths) == paths[2]
    assert refused_path(ServingError(invalid, "message 0: image 0 is empty (0 bytes)"), paths) == paths[0]
    assert refused_path(RefusedFile(ErrorCode.NOT_FOUND, "gone", "/u/z.png"), paths) == "/u/z.png"
    # Not about one image, an index out of range, or not an image error: nothing is removed.
    assert refused_path(ServingError(invalid, "the images of this request need 50 tiles"), paths) is None
    assert refused_path(ServingError(invalid, "image 7 (message 0): bad"), paths) is None
    assert refused_path(ServingError(ErrorCode.UNAVAILABLE, "image 0: the vision service is down"), paths) is None


def test_settle_removes_refused_images_and_marks_a_stopped_reply():
    refused = RefusedImages()
    refused.add("/u/bad.png", "cannot identify image file")
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/u/bad.png"}}]},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}]},
        {"role": "assistant", "content": "⚠️ **Error (invalid_argument):** bad.png was refused"},
        {"role": "user", "content": [{"type": "file", "file": {"path": "/u/good.png"}}, {"type": "text", "text": "and this?"}]},
        {"role": "assistant", "content": "a partial rep"},
        {"role": "assistant", "content": "the reply is streaming",
         "metadata": {"title": "⏳ generating · TTFT 0.31 s", "status": "pending"}},
    ]
    settled = settle(history, refused)
    assert settled is not None and len(settled) == len(history) - 1  # the bad image's message is gone
    assert all("bad.png" not in str(m["content"]) for m in settled if m["role"] == "user")
    assert settled[-1]["metadata"] == {"title": "⏹ stopped · TTFT 0.31 s", "status": "done"}
    assert settled[-2]["content"] == "a partial rep"
    assert settle(settled, refused) is None  # nothing left to do
    assert history[-1]["metadata"]["status"] == "pending"  # settle copies; settle_in_place edits
    settle_in_place(history)
    assert history[-1]["metadata"]["title"].startswith("⏹ stopped")
    # Stopped before the first token: the placeholder says so, and the model never sees it.
    early = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "…"},
             {"role": "assistant", "content": "x", "metadata": {"title": "⏳ generating", "status": "pending"}}]
    early = settle(early, RefusedImages())
    assert early[1]["content"] == "(stopped before the reply began)" and early[2]["metadata"]["title"] == "⏹ stopped"
    assert [(t.role, t.text) for t in history_turns(early)] == [("user", "hi"), ("assistant", "")]


def test_history_leaves_out_refused_images_and_files_that_are_not_images():
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": "/u/bad.png"}},
                                     {"type": "file", "file": {"path": "/u/notes.pdf"}},
                                     {"type": "file", "file": {"path": "/u/good.png"}}, "compare"]},
    ]
    (turn,) = history_turns(history, refused={"/u/bad.png"})
    assert turn.images == ["/u/good.png"] and turn.text == "compare"


def test_refused_images_keep_the_newest():
    refused = RefusedImages(capacity=2)
    for name in ("a", "b", "c"):
        refused.add(name, "why")
    assert "a" not in refused and list(refused) == ["b", "c"]
