"""A real Chromium on the real page: the UI (ivl_frontend.app.build_demo) served in the test process in
front of a running backend, and the page actions the browser tests share."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ivl_frontend.app import build_demo
from ivl_frontend.chat_handler import ChatHandler
from ivl_frontend.gateway_client import GatewayClient
from ivl_frontend.settings import FrontendSettings
from support.redis_server import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
INPUT = "#ivl-input"
BOT = "#ivl-chatbot [data-testid='bot']"
USER = "#ivl-chatbot [data-testid='user']"
GRID = re.compile(r"image (\d+): (\d+)×(\d+) grid")


class UI:
    """One page served by build_demo in this process, with its handler (to read its state)."""

    def __init__(self, stack, **overrides) -> None:
        self.stack = stack
        self.settings = FrontendSettings(gateway_address=stack.grpc_address, port=free_port(), **overrides)
        self.handler = ChatHandler(self.settings, GatewayClient(self.settings))
        self.demo = build_demo(self.settings, self.handler.client, self.handler)
        self.demo.launch(server_name="127.0.0.1", server_port=self.settings.port, prevent_thread_lock=True, quiet=True)
        self.url = f"http://127.0.0.1:{self.settings.port}/"

    def close(self) -> None:
        self.demo.close()
        self.handler.close()


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (the Debian package, driven by Playwright); artifacts/ exists for screenshots."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str):
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(url)
    page.wait_for_selector("#ivl-banner:has-text('Demo mode')", timeout=60_000)
    return page


def attach(page, *files: Path) -> None:
    page.set_input_files(f"{INPUT} input[data-testid='file-upload']", [str(f) for f in files])


def ask(page, text: str) -> None:
    page.fill(f"{INPUT} textarea[data-testid='textbox']", text)
    page.click(f"{INPUT} button[data-testid='submit-button']")


def replies_done(page) -> int:
    """Finished replies on the page: each has a stats note (… tokens/s) or an error."""
    text = page.inner_text("#ivl-chatbot")
    return text.count("tokens/s") + text.count("⚠️ Error") + text.count("⏹ stopped")
