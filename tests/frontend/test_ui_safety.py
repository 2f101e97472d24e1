"""The UI in front of strangers, against the real backend (redis-server + vision + LLM + gateway): a
refused image leaves the chat and the chat goes on; the preview shows the tile budget the chat uses;
a decode-time bomb never stalls the event loop that serves every user."""

from __future__ import annotations

import asyncio
import re
import shutil
import time

import pytest
from ivl_frontend.chat_handler import ChatHandler
from ivl_frontend.gateway_client import GatewayClient
from ivl_frontend.settings import FrontendSettings
from PIL import Image
from support.hostile_images import progressive_jpeg_bomb
from support.stack import running_stack

pytestmark = pytest.mark.slow
GRID = re.compile(r"image (\d+): (\d+)×(\d+) grid")


@pytest.fixture(scope="module")
def stack(tiny_original, tmp_path_factory):
    checkpoint = shutil.copytree(tiny_original, tmp_path_factory.mktemp("ui-safety") / "tiny-demo-checkpoint")
    with running_stack(checkpoint) as running:
        yield running


@pytest.fixture
def handler(stack, tmp_path):
    made: list[ChatHandler] = []

    def make(**overrides) -> ChatHandler:
        settings = FrontendSettings(gateway_address=stack.grpc_address, **overrides)
        made.append(ChatHandler(settings, GatewayClient(settings)))
        return made[-1]

    yield make
    for h in made:
        h.close()


def _picture(folder, name: str, size: tuple[int, int], colour: tuple[int, int, int]) -> str:
    path = folder / name
    Image.new("RGB", size, colour).save(path)
    return str(path)


async def test_a_refused_image_leaves_the_chat_and_the_next_message_works(handler, tmp_path):
    chat = handler()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    first = [o async for o in chat.respond({"text": "What is this?", "files": [str(broken)]}, [], max_new_tokens=4)]
    error = first[-1][0][0].content
    assert "broken.png was refused and is removed from this chat" in error and "image 0" in error, error
    assert str(broken) in chat.refused
    # What the page now holds: the after-reply step removes the refused image from the history.
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": str(broken)}}]},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": error}]},
    ]
    settled, _, _ = await chat.after_reply(history)
    assert [m["role"] for m in settled] == ["user", "assistant"] and "broken.png" not in str(settled[0])
    # The next message (with a good image) works, both with the settled history and with the history
    # as it was (an API client that never settles it): the refused image is not sent again.
    good = _picture(tmp_path, "good.png", (640, 480), (10, 200, 30))
    for past in (settled, history):
        out = [o async for o in chat.respond({"text": "And this one?", "files": [good]}, past, max_new_tokens=4)]
        reply, stats = out[-1][0]
        assert "⚠️" not in reply.content, reply.content
        assert "(0/1 images)" in stats.metadata["title"] or "(1/1 images)" in stats.metadata["title"]


async def test_a_file_that_is_gone_leaves_the_chat_too(handler, tmp_path):
    chat = handler()
    gone = _picture(tmp_path, "gone.png", (300, 200), (1, 2, 3))
    history = [{"role": "user", "content": [{"type": "file", "file": {"path": gone}}, {"type": "text", "text": "hi"}]},
               {"role": "assistant", "content": "hello"}]
    (tmp_path / "gone.png").unlink()
    first = [o async for o in chat.respond({"text": "again", "files": []}, history, max_new_tokens=4)]
    assert "gone.png was refused and is removed from this chat" in first[-1][0][0].content
    second = [o async for o in chat.respond({"text": "and now?", "files": []}, history, max_new_tokens=4)]
    assert "⚠️" not in second[-1][0][0].content


async def test_the_preview_shows_the_tile_budget_the_chat_then_uses(handler, tmp_path):
    chat = handler()
    paths = [_picture(tmp_path, "wide.png", (2400, 800), (200, 0, 0)),
             _picture(tmp_path, "tall.png", (800, 2400), (0, 200, 0)),
             _picture(tmp_path, "small.png", (300, 300), (0, 0, 200))]
    message = {"text": "Compare them.", "files": paths}
    pictures, captions, _ = await chat.plan_preview(message, 12, True)
    planned = GRID.findall(captions)
    assert len(pictures) == 3 and [(c, r) for _, c, r in planned] == [("3", "1"), ("1", "3"), ("1", "1")], captions
    assert all(int(c) * int(r) <= 12 // 3 for _, c, r in planned)  # the 3 images share max_tiles 12
    out = [o async for o in chat.respond(message, [], max_new_tokens=2, max_tiles=12)]
    used = GRID.findall(out[-1][2])
    assert used == planned, (captions, out[-1][2])


async def test_a_decode_time_bomb_never_stalls_the_event_loop(handler, tmp_path):
    bomb = tmp_path / "bomb.jpg"
    # 410 scans: under the vision service's limit (500), so the gateway plans it and the UI must protect itself;
    # ~8 s of decoding on an idle core when decoded (far past the 1 s render timeout on any machine)
    bomb.write_bytes(progressive_jpeg_bomb(4096, 4096, 400))
    message = {"text": "", "files": [str(bomb)]}
    lags: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.02)
            lags.append(time.monotonic() - before - 0.02)

    async def preview_with_ticker(chat: ChatHandler) -> tuple[str, float]:
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        started = time.monotonic()
        _, captions, _ = await chat.plan_preview(message, 6, True)
        took = time.monotonic() - started
        stop.set()
        await tick
        return captions, took

    # Defaults: refused from its header (its scan count) before any decoding.
    captions, took = await preview_with_ticker(handler())
    assert "410 scans" in captions and "no picture" in captions, captions
    # With the scan check off, the bomb really decodes, in a sandboxed preview worker; it is killed at the
    # render timeout, the caption comes without its picture, and the event loop ticked on throughout.
    lags.clear()
    captions, took = await preview_with_ticker(handler(preview_max_jpeg_scans=10**6, preview_timeout_s=1.0))
    assert "no picture: rendering took longer than 1 s" in captions, captions
    assert took < 20, took  # timeout 1 s + PlanImages; generous for a loaded 2-core machine
    assert lags and max(lags) < 1.0, f"the event loop stalled for {max(lags):.2f} s"
