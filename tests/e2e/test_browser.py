"""A real Chromium on the real page: the UI (ivl_frontend) in front of the real backend (redis-server,
vision, LLM, gateway from tests/support/stack.py, tiny checkpoint). Uploads an image, asks, sees the
tile-grid preview and a streamed reply with its stats, and saves artifacts/ui-chat.png."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from ivl_frontend.app import build_demo
from ivl_frontend.gateway_client import GatewayClient
from ivl_frontend.settings import FrontendSettings
from PIL import Image, ImageDraw
from support.redis_server import free_port
from support.stack import running_stack

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
INPUT = "#ivl-input"
BOT = "#ivl-chatbot [data-testid='bot']"


@pytest.fixture(scope="module")
def ui_and_stack(tiny_original, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/setup_env.sh does it)")
    demo_checkpoint = shutil.copytree(tiny_original, tmp_path_factory.mktemp("browser") / "tiny-demo-checkpoint")
    with running_stack(demo_checkpoint) as stack:
        settings = FrontendSettings(gateway_address=stack.grpc_address, port=free_port(), max_new_tokens=300)
        demo = build_demo(settings, GatewayClient(settings))
        demo.launch(server_name="127.0.0.1", server_port=settings.port, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{settings.port}/", stack
        finally:
            demo.close()


@pytest.fixture
def picture(tmp_path):
    image = Image.new("RGB", (960, 540), (30, 120, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse([120, 100, 420, 400], fill=(250, 200, 40))
    draw.rectangle([560, 140, 860, 440], fill=(200, 40, 60))
    path = tmp_path / "shapes.png"
    image.save(path)
    return path


def test_upload_ask_and_watch_the_streamed_reply_and_tile_preview_then_stop(ui_and_stack, picture):
    from playwright.sync_api import sync_playwright

    page_url, stack = ui_and_stack
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            page.goto(page_url)
            page.wait_for_selector("#ivl-banner:has-text('Demo mode')", timeout=60_000)
            page.set_input_files(f"{INPUT} input[data-testid='file-upload']", [str(picture)])
            # The tile preview appears as soon as the image is attached (gateway PlanImages).
            page.wait_for_selector("#ivl-tiles img", timeout=60_000)
            page.wait_for_selector("#ivl-tiles-info:has-text('will be cut into tiles')", timeout=30_000)
            page.fill(f"{INPUT} textarea[data-testid='textbox']", "What shapes are in this picture?")
            page.click(f"{INPUT} button[data-testid='submit-button']")
            page.wait_for_selector(BOT, timeout=60_000)
            lengths = []
            deadline = time.monotonic() + 120
            while "tokens/s" not in page.inner_text("#ivl-chatbot"):
                assert time.monotonic() < deadline, "no finished reply within 120 s"
                lengths.append(len(page.inner_text(BOT + " >> nth=0")))
                time.sleep(0.03)
            grew = sorted({n for n in lengths if n > 1})
            assert len(grew) >= 2, f"the reply did not stream (lengths seen: {grew})"
            chat_text = page.inner_text("#ivl-chatbot")
            assert "cache miss (0/1 images)" in chat_text and "TTFT" in chat_text
            assert "⚠️" not in chat_text
            info = page.inner_text("#ivl-tiles-info")
            assert "1 image was cut into tiles" in info and "visual tokens" in info and "960×540" in info
            tile_preview = page.locator("#ivl-tiles img").first
            assert tile_preview.evaluate("img => img.naturalWidth") > 0
            page.screenshot(path=str(ARTIFACTS / "ui-chat.png"), full_page=True)
            _stop_a_long_reply(page, stack)
        finally:
            browser.close()
    assert (ARTIFACTS / "ui-chat.png").stat().st_size > 10_000


def _stop_a_long_reply(page, stack) -> None:
    """A long follow-up, stopped with the Stop button: the text stops growing and the LLM's slot is free."""
    scheduler = stack.llm_servers[0].service.scheduler
    tokens = page.locator("#ivl-max-new-tokens input[type='number']")
    tokens.fill("2048")
    tokens.press("Enter")
    tokens.blur()
    page.wait_for_function(
        "() => document.querySelector('#ivl-max-new-tokens input[type=range]').value === '2048'", timeout=10_000
    )
    page.fill(f"{INPUT} textarea[data-testid='textbox']", "Tell me much more.")
    page.click(f"{INPUT} button[data-testid='submit-button']")
    second = page.locator(BOT).nth(2)  # answer 1, its stats note, answer 2
    deadline = time.monotonic() + 60
    while not (second.count() and len(second.inner_text()) > 20):
        assert time.monotonic() < deadline, "the follow-up did not start streaming"
        time.sleep(0.05)
    assert stack.run(_active(scheduler)) == 1
    page.click(f"{INPUT} button.stop-button")
    deadline = time.monotonic() + 5
    while stack.run(_active(scheduler)) != 0:
        assert time.monotonic() < deadline, "the LLM still generates after Stop was clicked"
        time.sleep(0.05)
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
    page.screenshot(path=str(ARTIFACTS / "ui-stop.png"), full_page=True)


async def _active(scheduler) -> int:
    return scheduler.active
