"""ChatHandler: the logic behind the page, one async method per UI event; no model code.

respond() streams a reply from the gateway and, when it is closed early (Stop, a closed tab),
cancels the gRPC call so the LLM stops generating. Errors become readable chat messages.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from ivl_proto.errors import ServingError
from ivl_proto.gateway.v1 import gateway_pb2

from ivl_frontend.conversation import (
    ERROR_MARK,
    Controls,
    build_request,
    history_turns,
    message_turn,
    tiling_options,
)
from ivl_frontend.gateway_client import GatewayClient
from ivl_frontend.reply_stats import ReplyStats
from ivl_frontend.settings import FrontendSettings
from ivl_frontend.tile_preview import preview

log = logging.getLogger(__name__)

Gallery = list[tuple[str, str]]

TINY_BANNER = (
    "⚠️ **Demo mode: this is the offline tiny *random* InternVL model — its replies are noise.** "
    "The whole pipeline (tiling, vision encoder, cache, LLM, streaming) is real. "
    "To chat with a real model, download a checkpoint and restart the stack with it:\n\n"
    "```bash\n"
    "huggingface-cli download OpenGVLab/InternVL2_5-1B --local-dir models/InternVL2_5-1B\n"
    "MODEL_PATH=models/InternVL2_5-1B scripts/run_stack.sh\n"
    "```"
)
DEMO_BANNER = (
    "🧪 **Demo model: a tiny InternVL trained on this machine on synthetic images** (not a released InternVL). "
    "It reads printed words, numbers and colours, and common Chinese words; try the examples under the chat: "
    "*What is written in the image?* · *What color is the shape?* · *图中写的是什么？* "
    "The small-text picture is the InternVL 1.5 idea at work: read with **Max tiles 12** it is legible in the "
    "448 px tiles; with **Max tiles 1** the single 448 px view is too coarse and the answer is a guess. "
    "Other questions get one of those kinds of answers. For a real model: "
    "`MODEL_PATH=models/InternVL2_5-1B scripts/run_stack.sh` (see README)."
)


def error_text(error: Exception) -> str:
    if isinstance(error, ServingError):
        return f"{ERROR_MARK} ({error.code.value}):** {error.message}"
    return f"{ERROR_MARK}:** the UI could not complete the request ({type(error).__name__}: {error})"


class ChatHandler:
    def __init__(self, settings: FrontendSettings, client: GatewayClient) -> None:
        self.settings = settings
        self.client = client
        # Preview PNGs live in the system temp folder, which Gradio serves files from.
        self.preview_dir = Path(tempfile.mkdtemp(prefix="ivl-ui-previews-"))

    async def banner(self) -> str:
        """Markdown shown on top of the page: the model, and the demo warning for the tiny model."""
        try:
            info = await self.client.info()
        except ServingError as error:
            return f"⚠️ **The gateway is not reachable** ({error.message}). Replies will fail until it is up."
        model = f"Model **{info.model_id or 'unknown'}** · template `{info.template or '?'}` · context {info.context_length}"
        if info.tiny_random_model:
            return f"{TINY_BANNER}\n\n{model}"
        return f"{DEMO_BANNER}\n\n{model}" if info.demo_model else model

    async def plan_preview(
        self, message: Mapping[str, Any] | None, max_tiles: float, use_thumbnail: bool, shown: str = ""
    ) -> tuple[Gallery | Any, str | Any, str | Any]:
        """How the images attached to the input box will be cut (gateway PlanImages). `shown` is the
        key of the preview on screen: typing (same images, same options) leaves it as it is, and so
        does an input box without images."""
        paths = [p for p in _paths(message) if p]
        key = "|".join([*paths, str(int(max_tiles)), str(bool(use_thumbnail))])
        if not paths or key == shown:
            return gr.skip(), gr.skip(), gr.skip()
        images = [gateway_pb2.Image(data=_read(p)) for p in paths]
        controls = Controls(max_tiles=int(max_tiles), use_thumbnail=bool(use_thumbnail))
        try:
            plans = await self.client.plan_images(
                gateway_pb2.PlanImagesRequest(images=images, tiling=tiling_options(controls))
            )
        except ServingError as error:
            gr.Warning(error.message)
            return gr.skip(), gr.skip(), gr.skip()
        gallery = [
            preview(path, plan, self.preview_dir, i + 1)
            for i, (path, plan) in enumerate(zip(paths, plans.plans, strict=False))
        ]
        return gallery, tiles_markdown(gallery, sent=False), key

    async def respond(
        self,
        message: Mapping[str, Any] | str,
        history: Sequence[Mapping[str, Any]],
        system_prompt: str = "",
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: float = 256,
        max_tiles: float = 12,
        use_thumbnail: bool = True,
    ) -> AsyncIterator[tuple[list[gr.ChatMessage], Gallery | Any, str | Any]]:
        """Yields (reply messages, tile previews, their captions) as the reply streams in."""
        controls = Controls(
            system_prompt=system_prompt or "",
            temperature=float(temperature),
            top_p=float(top_p),
            max_new_tokens=int(max_new_tokens),
            max_tiles=int(max_tiles),
            use_thumbnail=bool(use_thumbnail),
        )
        text = ""
        gallery: Gallery = []
        stats = ReplyStats()
        try:
            turns = [*history_turns(history), message_turn(message, self.settings.max_images_per_message)]
            request = build_request(turns, controls, request_id=f"ui-{uuid.uuid4().hex[:16]}")
            all_paths = [p for t in turns for p in t.images]
            latest = len(request.messages) - 1
            started = time.perf_counter()
            yield [gr.ChatMessage(content="…")], gr.skip(), gr.skip()
            stream = self.client.chat(request)
            async with contextlib.aclosing(stream):
                async for event in stream:
                    kind = event.WhichOneof("event")
                    if kind == "delta":
                        if stats.ttft_s is None:
                            stats.ttft_s = time.perf_counter() - started
                        text += event.delta
                        yield [gr.ChatMessage(content=text)], gr.skip(), gr.skip()
                    elif kind == "image" and event.image.message_index == latest:
                        item = _image_preview(all_paths, event.image, self.preview_dir)
                        if item is not None:
                            gallery.append(item)
                            yield [gr.ChatMessage(content=text or "…")], gallery, tiles_markdown(gallery, sent=True)
                    elif kind == "final":
                        stats.final = event.final
            if gallery:  # the final value also carries the previews (what API clients receive)
                yield _reply(text, stats), gallery, tiles_markdown(gallery, sent=True)
            else:
                yield _reply(text, stats), gr.skip(), gr.skip()
        except ServingError as error:
            yield _reply(text, stats, error_text(error)), gr.skip(), gr.skip()
        except Exception as error:  # a readable message in the chat instead of a red toast
            log.exception("chat request failed")
            yield _reply(text, stats, error_text(error)), gr.skip(), gr.skip()


def tiles_markdown(gallery: Gallery, sent: bool) -> str:
    """The captions of the previews as a list under the gallery (the gallery truncates them)."""
    lines = [f"- {caption}" for _, caption in gallery]
    count = "1 image" if len(gallery) == 1 else f"{len(gallery)} images"
    verb = ("was" if len(gallery) == 1 else "were") if sent else "will be"
    return f"**{count} {verb} cut into tiles:**\n" + "\n".join(lines)


def _reply(text: str, stats: ReplyStats, error: str | None = None) -> list[gr.ChatMessage]:
    body = f"{text}\n\n{error}" if (error and text) else (error or text or "(empty reply)")
    messages = [gr.ChatMessage(content=body)]
    if error is None or stats.final is not None:
        messages.append(gr.ChatMessage(content=stats.details(), metadata={"title": stats.title(), "status": "done"}))
    return messages


def _image_preview(paths: list[str], info: gateway_pb2.ImageInfo, out_dir: Path) -> tuple[str, str] | None:
    """The preview of one image of the request, or None if the gateway names an unknown image."""
    hit = "cache hit" if info.cache_hit else f"encoded in {info.encode_s:.2f} s"
    index = info.image_index
    if not 0 <= index < len(paths):
        log.warning("gateway reported image %d of a request with %d images", index, len(paths))
        return None
    picture, caption = preview(paths[index], info.plan, out_dir, index + 1)
    return picture, f"{caption} · {hit}"


def _paths(message: Mapping[str, Any] | None) -> list[str]:
    if not message:
        return []
    out = []
    for block in message.get("files") or []:
        path = block.get("path") if isinstance(block, Mapping) else (block if isinstance(block, str) else None)
        if path:
            out.append(str(path))
    return out


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()
