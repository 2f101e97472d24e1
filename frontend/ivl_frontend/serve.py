"""Serving the page: launch with login, public link (failing softly offline) and telemetry off."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import gradio as gr

from ivl_frontend.settings import FrontendSettings

log = logging.getLogger("ivl_frontend")

SHARE_FAILED = (
    "could not create a public --share link (it needs internet access to gradio.app); "
    "the UI keeps serving locally at {url}"
)
AUTH_MESSAGE = "This InternVL demo is protected: sign in with the user and password you were given."


@dataclass(frozen=True)
class Served:
    local_url: str
    share_url: str | None


def disable_telemetry() -> None:
    """Gradio analytics and Hugging Face telemetry off (unless the operator set them explicitly)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def launch(demo: gr.Blocks, settings: FrontendSettings) -> Served:
    """Start serving in background threads and return the URLs; a failed --share only warns."""
    _, local_url, share_url = demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=settings.share,
        auth=settings.auth_pairs() or None,
        auth_message=AUTH_MESSAGE,
        root_path=settings.root_path or None,
        prevent_thread_lock=True,
        show_error=True,
        quiet=True,
        footer_links=["api"],
    )
    log.info("UI ready at %s (gateway %s)", local_url, settings.gateway_address)
    if settings.share:
        if share_url:
            log.info("public link: %s", share_url)
        else:
            log.warning(SHARE_FAILED.format(url=local_url))
    return Served(local_url=local_url, share_url=share_url or None)
