"""ChatHandler: the logic behind the page, one async method per UI event; no model code.

respond() streams a reply from the gateway and, when it is closed early (Stop, a closed tab),
cancels the gRPC call so the LLM stops generating. Errors become readable chat messages; an image
the stack refuses is remembered (RefusedImages) and left out of the chat from then on. Nothing
blocking runs on the event loop: files are read in threads, previews rendered in the PreviewPool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.gateway.v1 import gateway_pb2

from ivl_frontend.conversation import (
    ERROR_MARK,
    PLACEHOLDER,
    Controls,
    RefusedFile,
    build_request,
    history_turns,
    is_image_path,
    message_turn,
    tiling_options,
)
from ivl_frontend.gateway_client import GatewayClient
from ivl_frontend.history_cleanup import RefusedImages, settle, settle_in_place
from ivl_frontend.previews import PreviewItem, Previews, gallery, tiles_markdown
from ivl_frontend.reply_stats import ReplyStats
from ivl_frontend.settings import FrontendSettings
from ivl_frontend.tile_preview import plan_caption

log = logging.getLogger(__name__)

Gallery = list[tuple[str, str]]
NO_IMAGES_YET = "Attach an image to see how it is cut into tiles."
# The gateway names the image an error is about: "image 2 (message 1): ...", "image 2 is 9000x9000 ...",
# "message 1: image 2 is empty" (2 = the image's index among all images of the request).
_IMAGE_INDEX = re.compile(r"(?:message \d+: )?image (\d+)\b")
_IMAGE_CODES = (ErrorCode.INVALID_ARGUMENT, ErrorCode.PAYLOAD_TOO_LARGE, ErrorCode.NOT_FOUND)

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
    "It names the colour of a shape: try the examples under the chat (*What color is the shape?*). To anything "
    "else it answers with a colour word, or something like one. Its vision tower was also pre-trained to read "
    "printed characters, but on 2 CPU cores it has not learned to answer reading questions (docs/demo_model.md "
    "has the measured accuracy). "
    "For a real model: `MODEL_PATH=models/InternVL2_5-1B scripts/run_stack.sh` (see README)."
)


def error_text(error: Exception) -> str:
    if isinstance(error, ServingError):
        return f"{ERROR_MARK} ({error.code.value}):** {error.message}"
    return f"{ERROR_MARK}:** the UI could not complete the request ({type(error).__name__}: {error})"


class ChatHandler:
    def __init__(self, settings: FrontendSettings, client: GatewayClient, previews: Previews | None = None) -> None:
        self.settings = settings
        self.client = client
        self.previews = previews if previews is not None else Previews(settings)
        self.refused = RefusedImages()

    async def banner(self) -> str:
        """Markdown shown on top of the page: the model, and the demo warning for the tiny model. (The first page
        load also starts the sandboxed preview workers in the serving loop, so no preview waits for them.)"""
        self.previews.warm()
        try:
            info = await self.client.info()
        except ServingError as error:
            return f"⚠️ **The gateway is not reachable** ({error.message}). Replies will fail until it is up."
        model = f"Model **{info.model_id or 'unknown'}** · template `{info.template or '?'}` · context {info.context_length}"
        if info.tiny_random_model:
            return f"{TINY_BANNER}\n\n{model}"
        return f"{DEMO_BANNER}\n\n{model}" if info.demo_model else model

    async def plan_preview(
        self,
        message: Mapping[str, Any] | None,
        max_tiles: float,
        use_thumbnail: bool,
        shown: str = "",
        request: gr.Request | None = None,
    ) -> tuple[Gallery | Any, str | Any, str | Any]:
        """How the images attached to the input box will be cut (gateway PlanImages, with the budget
        they share). `shown` is the key of the preview on screen: typing (same images, same options)
        leaves it as it is, and so does an input box without images."""
        paths = [p for p in _paths(message) if p and is_image_path(p)]
        key = "|".join([*paths, str(int(max_tiles)), str(bool(use_thumbnail))])
        if not paths or key == shown:
            return gr.skip(), gr.skip(), gr.skip()
        controls = Controls(max_tiles=int(max_tiles), use_thumbnail=bool(use_thumbnail))
        try:
            images = [gateway_pb2.Image(data=data) for data in await asyncio.to_thread(_read_all, paths)]
            plans = await self.client.plan_images(
                gateway_pb2.PlanImagesRequest(images=images, tiling=tiling_options(controls))
            )
        except OSError as error:
            gr.Warning(f"an attached file is not readable ({error.strerror}); attach it again")
            return gr.skip(), gr.skip(), gr.skip()
        except ServingError as error:
            gr.Warning(error.message)
            return gr.skip(), gr.skip(), gr.skip()
        session = _session(request)
        items = await asyncio.gather(*(
            self.previews.item(path, plan, plan_caption(plan, i + 1), session)
            for i, (path, plan) in enumerate(zip(paths, plans.plans, strict=False))
        ))
        return gallery(items), tiles_markdown(items, sent=False), key

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
        request: gr.Request | None = None,
    ) -> AsyncIterator[tuple[list[gr.ChatMessage], Gallery | Any, str | Any]]:
        """Yields (reply messages, tile previews, their captions) as the reply streams in. While it
        streams, the stats note is "generating" (status pending); history_cleanup marks it "stopped"
        if the reply ends there (Stop)."""
        settle_in_place(history)  # earlier replies' notes, should the after-reply step have lost a race
        controls = Controls(
            system_prompt=system_prompt or "",
            temperature=float(temperature),
            top_p=float(top_p),
            max_new_tokens=int(max_new_tokens),
            max_tiles=int(max_tiles),
            use_thumbnail=bool(use_thumbnail),
        )
        session = _session(request)
        text = ""
        stats = ReplyStats()
        all_paths: list[str] = []
        previews: list[tuple[int, asyncio.Task[PreviewItem]]] = []
        try:
            turns = [*history_turns(history, self.refused), message_turn(message, self.settings.max_images_per_message)]
            all_paths = [p for t in turns for p in t.images]
            request_pb = await asyncio.to_thread(
                build_request, turns, controls, f"ui-{uuid.uuid4().hex[:16]}"
            )
            latest = len(request_pb.messages) - 1
            started = time.perf_counter()
            yield _streaming(PLACEHOLDER, stats), gr.skip(), gr.skip()
            last_update, shown_previews, behind, first = time.monotonic(), 0, False, False
            stream = self.client.chat(request_pb)
            async with contextlib.aclosing(stream):
                async for event in stream:
                    kind = event.WhichOneof("event")
                    if kind == "delta":
                        first = stats.ttft_s is None
                        if first:
                            stats.ttft_s = time.perf_counter() - started
                        text += event.delta
                        behind = True
                    elif kind == "image" and event.image.message_index == latest:
                        task = asyncio.ensure_future(self._image_preview(all_paths, event.image, session))
                        previews.append((event.image.image_index, task))
                    elif kind == "final":
                        stats.final = event.final
                    done = sum(task.done() for _, task in previews)
                    if done != shown_previews:
                        shown_previews = done
                        items = _finished(previews)
                        yield _streaming(text or PLACEHOLDER, stats), gallery(items), tiles_markdown(items, sent=True)
                        last_update, behind = time.monotonic(), False
                    elif behind and (first or time.monotonic() - last_update >= self.settings.stream_interval_s):
                        yield _streaming(text, stats), gr.skip(), gr.skip()
                        last_update, behind = time.monotonic(), False
            if previews:  # the final value also carries the previews (what API clients receive)
                await asyncio.wait([task for _, task in previews])
                items = _finished(previews)
                yield _reply(text, stats), gallery(items), tiles_markdown(items, sent=True)
            else:
                yield _reply(text, stats), gr.skip(), gr.skip()
        except ServingError as error:
            yield _reply(text, stats, self._error_text(error, all_paths)), gr.skip(), gr.skip()
        except Exception as error:  # a readable message in the chat instead of a red toast
            log.exception("chat request failed")
            yield _reply(text, stats, error_text(error)), gr.skip(), gr.skip()
        finally:
            for _, task in previews:
                task.cancel()

    def _error_text(self, error: ServingError, paths: list[str]) -> str:
        """The error note; an error about one image also removes that image from the chat."""
        path = refused_path(error, paths)
        if path is None:
            return error_text(error)
        self.refused.add(path, error.message)
        log.info("image %s refused (%s): %s", Path(path).name, error.code.value, error.message)
        return (
            f"{ERROR_MARK} ({error.code.value}):** {Path(path).name} was refused and is removed from this chat "
            f"(attach another image to go on): {error.message}"
        )

    async def _image_preview(self, paths: list[str], info: gateway_pb2.ImageInfo, session: str) -> PreviewItem:
        hit = "cache hit" if info.cache_hit else f"encoded in {info.encode_s:.2f} s"
        index = info.image_index
        if not 0 <= index < len(paths):
            log.warning("gateway reported image %d of a request with %d images", index, len(paths))
            return PreviewItem(None, f"image {index + 1}: not in this request")
        return await self.previews.item(paths[index], info.plan, f"{plan_caption(info.plan, index + 1)} · {hit}", session)

    async def after_reply(self, history: list[dict[str, Any]] | None) -> tuple[Any, Any, Any]:
        """Runs after every reply, finished, failed or stopped (chat_interface.py): refused images out
        of the history, a stopped reply marked "stopped"; the previews' status reset (no error badges)."""
        settled = settle(history or [], self.refused)
        return (settled if settled is not None else gr.skip()), gr.skip(), gr.skip()

    async def clear_chat(self, request: gr.Request | None = None) -> tuple[Gallery, str]:
        """The chat was cleared: its preview files go, and the preview shows nothing."""
        self.previews.release(_session(request))
        return [], NO_IMAGES_YET

    async def forget_session(self, request: gr.Request | None = None) -> None:
        """The tab was closed: its preview files go."""
        self.previews.release(_session(request))

    def close(self) -> None:
        self.previews.close()


def refused_path(error: ServingError, paths: list[str]) -> str | None:
    """The file an error is about (it is then removed from the chat), or None."""
    if isinstance(error, RefusedFile):
        return error.path
    if error.code not in _IMAGE_CODES:
        return None
    found = _IMAGE_INDEX.match(error.message)
    if found is None or int(found.group(1)) >= len(paths):
        return None
    return paths[int(found.group(1))]


def _finished(previews: list[tuple[int, asyncio.Task[PreviewItem]]]) -> list[PreviewItem]:
    done = [(index, task) for index, task in previews if task.done() and not task.cancelled()]
    return [task.result() for _, task in sorted(done, key=lambda pair: pair[0])]


def _streaming(text: str, stats: ReplyStats) -> list[gr.ChatMessage]:
    """The reply so far and its stats note, pending."""
    note = gr.ChatMessage(content="streaming…", metadata={"title": stats.live_title(), "status": "pending"})
    return [gr.ChatMessage(content=text), note]


def _reply(text: str, stats: ReplyStats, error: str | None = None) -> list[gr.ChatMessage]:
    body = f"{text}\n\n{error}" if (error and text) else (error or text or "(empty reply)")
    messages = [gr.ChatMessage(content=body)]
    if error is None or stats.final is not None:
        messages.append(gr.ChatMessage(content=stats.details(), metadata={"title": stats.title(), "status": "done"}))
    return messages


def _session(request: gr.Request | None) -> str:
    return str(getattr(request, "session_hash", None) or "")


def _paths(message: Mapping[str, Any] | None) -> list[str]:
    if not message:
        return []
    out = []
    for block in message.get("files") or []:
        path = block.get("path") if isinstance(block, Mapping) else (block if isinstance(block, str) else None)
        if path:
            out.append(str(path))
    return out


def _read_all(paths: list[str]) -> list[bytes]:
    return [Path(p).read_bytes() for p in paths]
