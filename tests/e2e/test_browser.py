"""A real Chromium on the real page: the UI (ivl_frontend) in front of the real backend (redis-server,
vision, LLM, gateway from tests/support/stack.py, tiny checkpoint). Uploads an image, asks, sees the
tile-grid preview and a streamed reply with its stats, stops a long reply (no error badges, "stopped"
shown); a refused image then a good one in the same chat; the multi-image tile budget in the preview;
a decode-time bomb attached in one tab while another tab keeps working. Saves artifacts/ui-*.png."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from support.browser_page import (
    ARTIFACTS,
    BOT,
    CHROMIUM,
    GRID,
    INPUT,
    UI,
    USER,
    ask,
    attach,
    chromium,
    open_page,
)
from support.hostile_images import progressive_jpeg_bomb
from support.stack import running_stack
from support.waiting import wait_until as wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tiny_original, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/setup_env.sh does it)")
    demo_checkpoint = shutil.copytree(tiny_original, tmp_path_factory.mktemp("browser") / "tiny-demo-checkpoint")
    with running_stack(demo_checkpoint) as running:
        yield running


@pytest.fixture(scope="module")
def ui(stack):
    page_ui = UI(stack, max_new_tokens=300)
    try:
        yield page_ui
    finally:
        page_ui.close()


@pytest.fixture(scope="module")
def browser():
    with chromium() as running:
        yield running


def picture(folder: Path, name: str, size: tuple[int, int], colour: tuple[int, int, int]) -> Path:
    image = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(image)
    draw.ellipse([size[0] // 8, size[1] // 5, size[0] // 2, size[1] * 4 // 5], fill=(250, 200, 40))
    path = folder / name
    image.save(path)
    return path


def test_upload_ask_and_watch_the_streamed_reply_and_tile_preview_then_stop(ui, browser, tmp_path):
    page = open_page(browser, ui.url)
    attach(page, picture(tmp_path, "shapes.png", (960, 540), (30, 120, 200)))
    # The tile preview appears as soon as the image is attached (gateway PlanImages).
    page.wait_for_selector("#ivl-tiles img", timeout=60_000)
    page.wait_for_selector("#ivl-tiles-info:has-text('will be cut into tiles')", timeout=30_000)
    # The page itself records the length of the first reply at every change (no polling from here).
    page.evaluate("""() => {
        window.ivlLengths = [];
        new MutationObserver(() => {
            const reply = document.querySelector("#ivl-chatbot [data-testid='bot']");
            if (reply) window.ivlLengths.push(reply.innerText.length);
        }).observe(document.querySelector("#ivl-chatbot"), {subtree: true, childList: true, characterData: true});
    }""")
    ask(page, "What shapes are in this picture?")
    wait_for(lambda: "tokens/s" in page.inner_text("#ivl-chatbot"), 120, "a finished reply")
    grew = sorted({n for n in page.evaluate("window.ivlLengths") if n > 1})
    assert len(grew) >= 2, f"the reply did not stream (lengths seen: {grew})"
    chat_text = page.inner_text("#ivl-chatbot")
    assert "cache miss (0/1 images)" in chat_text and "TTFT" in chat_text
    assert "⚠️" not in chat_text
    info = page.inner_text("#ivl-tiles-info")
    assert "1 image was cut into tiles" in info and "visual tokens" in info and "960×540" in info
    tile_preview = page.locator("#ivl-tiles img").first
    assert tile_preview.evaluate("img => img.naturalWidth") > 0
    page.screenshot(path=str(ARTIFACTS / "ui-chat.png"), full_page=True)
    _stop_a_long_reply(page, ui)
    assert (ARTIFACTS / "ui-chat.png").stat().st_size > 10_000


def _stop_a_long_reply(page, ui) -> None:
    """A long follow-up, stopped with the Stop button: the text stops growing, the LLM's slot is free,
    the reply says "stopped" and nothing on the page shows an error badge."""
    stack = ui.stack
    service = stack.llm_servers[0].service
    scheduler = service.scheduler
    # The tiny random model may end a reply early by emitting its end token; this one must talk on
    # until Stop, so its stop tokens are off for this reply (2048 tokens take ~15 s here).
    stop_tokens, service.stop_token_ids = service.stop_token_ids, frozenset()
    try:
        _stop_and_check(page, stack, scheduler)
    finally:
        service.stop_token_ids = stop_tokens


def _stop_and_check(page, stack, scheduler) -> None:
    tokens = page.locator("#ivl-max-new-tokens input[type='number']")
    tokens.fill("2048")
    tokens.press("Enter")
    tokens.blur()
    page.wait_for_function(
        "() => document.querySelector('#ivl-max-new-tokens input[type=range]').value === '2048'", timeout=10_000
    )
    ask(page, "Tell me much more.")
    # Watched from the LLM's side (the page may lag behind on this loaded machine): it generates...
    wait_for(lambda: stack.run(_active(scheduler)) == 1, 60, "the follow-up to start generating")
    time.sleep(1.0)
    assert stack.run(_active(scheduler)) == 1, "the reply ended on its own before Stop"
    page.locator(f"{INPUT} button.stop-button").dispatch_event("click")  # a real click can wait on layout
    wait_for(lambda: stack.run(_active(scheduler)) == 0, 10, "the LLM to free its slot after Stop")
    second = page.locator(BOT).nth(2)  # answer 1, its stats note, answer 2
    wait_for(lambda: second.count() and len(second.inner_text()) > 0, 30, "the stopped reply on the page")
    # Deltas already on their way to the browser when the slot was freed may still land: let the text
    # settle (unchanged for 0.5 s, within 5 s), then it must not grow any more, although 2048 tokens
    # were asked for and generation would otherwise run on for many seconds.
    settled_by = time.monotonic() + 5
    stopped = second.inner_text()
    while True:
        time.sleep(0.5)
        now = second.inner_text()
        if now == stopped:
            break
        assert time.monotonic() < settled_by, "the reply still grows 5 s after the LLM slot was freed"
        stopped = now
    time.sleep(1.5)
    assert second.inner_text() == stopped, "the reply kept growing after Stop"
    wait_for(lambda: "⏹ stopped" in page.inner_text("#ivl-chatbot"), 15, "the reply to be marked stopped")
    chat_text = page.inner_text("#ivl-chatbot")
    assert "⏳ generating" not in chat_text and "⚠️" not in chat_text
    for area in ("#ivl-tiles", "#ivl-tiles-info", "#ivl-chatbot"):
        assert page.locator(f"{area} :text-is('Error')").count() == 0, f"an error badge on {area} after Stop"
    page.screenshot(path=str(ARTIFACTS / "ui-stop.png"), full_page=True)
    # The chat goes on after a stop.
    tokens.fill("8")
    tokens.press("Enter")
    tokens.blur()
    ask(page, "Short, please.")
    wait_for(lambda: page.inner_text("#ivl-chatbot").count("tokens/s") >= 2, 120, "a reply after the stop")
    assert "⏹ stopped" in page.inner_text("#ivl-chatbot")  # still marked on the earlier reply


async def _active(scheduler) -> int:
    return scheduler.active


def test_a_refused_image_leaves_the_chat_and_a_good_one_works_next(ui, browser, tmp_path):
    page = open_page(browser, ui.url)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not a PNG at all")
    attach(page, broken)
    ask(page, "What is in this picture?")
    wait_for(lambda: "was refused and is removed from this chat" in page.inner_text("#ivl-chatbot"), 60,
             "the refusal in the chat")
    # The refused image's message is removed from the history; the error says which file and why.
    def refused_image_shown() -> bool:
        return page.evaluate(
            "(sel) => Array.from(document.querySelectorAll(sel)).some(e => e.innerHTML.includes('broken'))", USER
        )

    wait_for(lambda: not refused_image_shown(), 15, "the refused image to leave the chat")
    assert page.locator(USER).count() == 1  # the question stays, the image is gone
    attach(page, picture(tmp_path, "good.png", (640, 480), (10, 180, 60)))
    page.wait_for_selector("#ivl-tiles-info:has-text('will be cut into tiles')", timeout=60_000)
    ask(page, "And this one?")
    wait_for(lambda: "tokens/s" in page.inner_text("#ivl-chatbot"), 120, "the reply to the good image")
    text = page.inner_text("#ivl-chatbot")
    assert "cache miss (0/1 images)" in text  # only the good image was sent
    assert text.count("⚠️") == 1  # the one refusal; the second reply has no error
    page.screenshot(path=str(ARTIFACTS / "ui-refused-image.png"), full_page=True)


def test_the_preview_shows_the_tile_budget_that_the_chat_then_reports(ui, browser, tmp_path):
    page = open_page(browser, ui.url)
    assert page.locator("#ivl-max-tiles input[type='number']").input_value() == "12"
    attach(page, picture(tmp_path, "wide.png", (2400, 800), (200, 30, 30)),
           picture(tmp_path, "tall.png", (800, 2400), (30, 200, 30)),
           picture(tmp_path, "small.png", (300, 300), (30, 30, 200)))
    page.wait_for_selector("#ivl-tiles-info:has-text('3 images will be cut into tiles')", timeout=60_000)
    planned = GRID.findall(page.inner_text("#ivl-tiles-info"))
    # 3 images share max_tiles 12: 4 tiles each at most (alone, the wide one would be 6×2).
    assert [(c, r) for _, c, r in planned] == [("3", "1"), ("1", "3"), ("1", "1")], planned
    ask(page, "Compare them.")
    page.wait_for_selector("#ivl-tiles-info:has-text('3 images were cut into tiles')", timeout=120_000)
    wait_for(lambda: "tokens/s" in page.inner_text("#ivl-chatbot"), 120, "the reply")
    used = GRID.findall(page.inner_text("#ivl-tiles-info"))
    assert used == planned
    assert "cache miss (0/3 images)" in page.inner_text("#ivl-chatbot")
    page.screenshot(path=str(ARTIFACTS / "ui-tile-budget.png"), full_page=True)
    # Clearing the chat deletes its preview files (no other tab shows these pictures) and the preview.
    store = ui.handler.previews.store
    sources = page.evaluate(
        "() => Array.from(document.querySelectorAll('#ivl-tiles img')).map(i => decodeURIComponent(i.src))"
    )
    files = [store.folder / Path(src.split("file=", 1)[-1]).name for src in sources if store.folder.name in src]
    assert files and all(f.exists() for f in files)
    page.click("#ivl-chatbot button[aria-label='Clear']")
    page.wait_for_selector("#ivl-tiles-info:has-text('Attach an image')", timeout=30_000)
    wait_for(lambda: not any(f.exists() for f in files), 15, "the cleared chat's preview files to be deleted")


def test_a_decode_time_bomb_in_one_tab_does_not_freeze_another_tab(stack, browser, tmp_path):
    """Tab A attaches a progressive 8000x8000 JPEG with 480 scans (~30 s to decode on an idle core here;
    under the vision service's scan limit, so the gateway plans it). This page has the UI's own header check
    on scans switched off, so the bomb really is decoded, in a sandboxed preview worker; tab B meanwhile gets
    its own preview and a chat reply as usual, and the bomb's worker is killed at the render timeout (12 s:
    well under the decode on a machine twice as fast, and over tab B's preview on a loaded one)."""
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(progressive_jpeg_bomb(8000, 8000, 480))
    timeout_s = 12.0
    bomb_ui = UI(stack, max_new_tokens=8, preview_max_jpeg_scans=10**6, preview_timeout_s=timeout_s,
                 preview_memory_mb=2048)
    try:
        tab_a, tab_b = open_page(browser, bomb_ui.url), open_page(browser, bomb_ui.url)
        pool = bomb_ui.handler.previews.pool
        attach(tab_a, bomb)
        wait_for(lambda: pool.running > 0, 30, "the bomb's preview render to start")
        started = time.monotonic()
        attach(tab_b, picture(tmp_path, "normal.png", (800, 600), (90, 90, 200)))
        tab_b.wait_for_selector("#ivl-tiles img", timeout=60_000)
        preview_s = time.monotonic() - started
        rendering_during_b = pool.running > 0  # tab B's preview was rendered beside the bomb's
        ask(tab_b, "What is this?")
        reply_s = wait_for(lambda: "tokens/s" in tab_b.inner_text("#ivl-chatbot"), 120, "tab B's reply")
        assert preview_s < timeout_s, f"tab B waited {preview_s:.1f} s for its preview"
        assert rendering_during_b, "the bomb was not decoding while tab B's preview was made: the check proves nothing"
        assert reply_s < 60, f"tab B waited {reply_s:.1f} s for its reply"
        # Tab A gets its caption without a picture once the render timeout passed; the worker was killed.
        tab_a.wait_for_selector("#ivl-tiles-info:has-text('no picture')", timeout=60_000)
        stats = pool.sandbox.pool.stats
        assert stats.cancel_kills + stats.cpu_kills + stats.wall_kills >= 1
        tab_b.screenshot(path=str(ARTIFACTS / "ui-bomb-other-tab.png"), full_page=True)
        print(f"tab B during the bomb: preview {preview_s:.2f} s, reply {reply_s:.2f} s")
    finally:
        bomb_ui.close()
