"""Previews: the tile-grid pictures next to the chat, made without blocking the UI's event loop.

Reading and hashing the file run in a thread, rendering in the PreviewPool's sandboxed workers, the PNG files
are kept by the PreviewStore. An image that gets no picture (refused by render_preview, or no
picture in time) still gets its caption, with the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path

from gradio.utils import get_upload_folder
from ivl_proto.common.v1 import common_pb2

from ivl_frontend.preview_pool import PreviewPool, PreviewRefused, PreviewUnavailable, RenderLimits
from ivl_frontend.preview_store import PreviewStore
from ivl_frontend.settings import FrontendSettings
from ivl_frontend.tile_preview import PREVIEW_MAX_SIDE


@dataclass(frozen=True)
class PreviewItem:
    picture: str | None  # PNG file, or None: caption only
    caption: str


def gallery(items: list[PreviewItem]) -> list[tuple[str, str]]:
    """The (picture, caption) pairs a gr.Gallery shows (items without a picture are in the list only)."""
    return [(item.picture, item.caption) for item in items if item.picture is not None]


def tiles_markdown(items: list[PreviewItem], sent: bool) -> str:
    """The captions as a list under the gallery (the gallery truncates them)."""
    lines = [f"- {item.caption}" for item in items]
    count = "1 image" if len(items) == 1 else f"{len(items)} images"
    verb = ("was" if len(items) == 1 else "were") if sent else "will be"
    return f"**{count} {verb} cut into tiles:**\n" + "\n".join(lines)


def _read_and_key(path: str, plan: common_pb2.ImagePlan) -> tuple[bytes, str]:
    data = Path(path).read_bytes()
    key = hashlib.sha256(data + plan.SerializeToString(deterministic=True)).hexdigest()[:24]
    return data, key


class Previews:
    def __init__(self, settings: FrontendSettings, root: Path | None = None) -> None:
        limits = RenderLimits(
            max_side=PREVIEW_MAX_SIDE, max_pixels=settings.preview_max_pixels,
            max_jpeg_scans=settings.preview_max_jpeg_scans, memory_bytes=settings.preview_memory_mb << 20,
        )
        self.pool = PreviewPool(settings.preview_workers, settings.preview_timeout_s, limits=limits)
        self.store = PreviewStore(root or Path(get_upload_folder()), settings.preview_ttl_s)

    async def item(self, path: str, plan: common_pb2.ImagePlan, caption: str, session: str) -> PreviewItem:
        try:
            data, key = await asyncio.to_thread(_read_and_key, path, plan)
        except OSError as error:
            return PreviewItem(None, f"{caption} · no picture (the file is not readable: {error.strerror})")
        cached = self.store.get(key, session)
        if cached is not None:
            return PreviewItem(cached, caption)
        try:
            png = await self.pool.render(data, plan, key=key, owner=session)
        except (PreviewRefused, PreviewUnavailable) as why:
            return PreviewItem(None, f"{caption} · no picture: {why}")
        return PreviewItem(await asyncio.to_thread(self.store.put, key, png, session), caption)

    def warm(self) -> None:
        """Start the preview workers in the background (the running loop is Gradio's)."""
        if self.pool.sandbox is not None:
            self.pool.sandbox.start_soon()

    def release(self, session: str) -> int:
        return self.store.release(session)

    def close(self) -> None:
        self.pool.close()
        self.store.close()
