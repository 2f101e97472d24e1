"""Turn Gradio chat history + the new multimodal message into a gateway ChatRequest.

Gradio hands history as openai-style dicts whose content is a string, a file dict, or a list of
blocks ({"type": "text", "text": ...} / {"type": "file", "file": {"path": ...}}). Every earlier
image is sent again each turn (the gateway's embedding cache makes that cheap); assistant notes
that carry metadata (the per-reply stats line) are display-only and never reach the model. An image
the stack refused (in `refused`) is left out of every later request, so one bad file does not break
the rest of the chat; so is a file of an earlier turn that is not an image (it was refused when sent).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.gateway.v1 import gateway_pb2

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ROLES = {"user": common_pb2.ROLE_USER, "assistant": common_pb2.ROLE_ASSISTANT, "system": common_pb2.ROLE_SYSTEM}


@dataclass
class Turn:
    """One message: its role, its text and the paths of its images, in order."""

    role: str
    text: str = ""
    images: list[str] = field(default_factory=list)


class RefusedFile(ServingError):
    """An error about one attached file (`path`): the UI removes that file from the chat."""

    def __init__(self, code: ErrorCode, message: str, path: str) -> None:
        super().__init__(code, message)
        self.path = path


def file_path(block: Any) -> str | None:
    """The path of a file block of a Gradio message in any of its shapes, else None."""
    if isinstance(block, Mapping):
        if isinstance(block.get("file"), Mapping):
            return file_path(block["file"])
        path = block.get("path")
        return str(path) if path else None
    path = getattr(block, "path", None)
    return str(path) if path else None


def blocks(content: Any) -> Iterable[Any]:
    if isinstance(content, list | tuple):
        return content
    return [content]


def is_image_path(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def _add_block(turn: Turn, block: Any, refused: Container[str] = (), strict: bool = True) -> None:
    if isinstance(block, str):
        turn.text = f"{turn.text}\n{block}" if turn.text else block
        return
    if isinstance(block, Mapping) and block.get("type") == "text":
        _add_block(turn, str(block.get("text", "")))
        return
    path = file_path(block)
    if path is None or path in refused:
        return  # other blocks (components rendered in the chat) carry nothing for the model
    if is_image_path(path):
        turn.images.append(path)
    elif strict:
        raise RefusedFile(
            ErrorCode.INVALID_ARGUMENT,
            f"{Path(path).name} is not an image; attach PNG, JPEG, WebP, BMP, GIF or TIFF files",
            path,
        )


ERROR_MARK = "⚠️ **Error"
PLACEHOLDER = "…"  # the reply shown until the first token
STOPPED_EARLY = "(stopped before the reply began)"


def history_turns(history: Sequence[Mapping[str, Any]], refused: Container[str] = ()) -> list[Turn]:
    """The conversation so far, consecutive messages of one role merged into one turn. The UI's own
    error notes in earlier replies are cut off: the model never wrote them. Files in `refused` and
    files that are not images are left out."""
    turns: list[Turn] = []
    for message in history:
        role = str(message.get("role", "user"))
        if role not in ROLES or (role == "assistant" and message.get("metadata")):
            continue
        if not turns or turns[-1].role != role:
            turns.append(Turn(role=role))
        for block in blocks(message.get("content")):
            _add_block(turns[-1], block, refused, strict=False)
        if role == "assistant" and ERROR_MARK in turns[-1].text:
            turns[-1].text = turns[-1].text.split(ERROR_MARK, 1)[0].rstrip()
        if role == "assistant" and turns[-1].text in (PLACEHOLDER, STOPPED_EARLY):
            turns[-1].text = ""  # a reply stopped before its first token: the model wrote nothing
    return turns


def message_turn(message: Mapping[str, Any] | str, max_images: int) -> Turn:
    """The new user message ({"text": ..., "files": [...]} from a MultimodalTextbox)."""
    turn = Turn(role="user")
    if isinstance(message, str):
        turn.text = message
    else:
        turn.text = str(message.get("text") or "")
        for block in message.get("files") or []:
            _add_block(turn, {"path": block} if isinstance(block, str) else block)
    if not turn.text.strip() and not turn.images:
        raise ServingError(ErrorCode.INVALID_ARGUMENT, "the message is empty: type a question or attach an image")
    if len(turn.images) > max_images:
        raise ServingError(
            ErrorCode.INVALID_ARGUMENT,
            f"{len(turn.images)} images in one message; the limit is {max_images}",
        )
    return turn


def _read_image(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise RefusedFile(
            ErrorCode.NOT_FOUND,
            f"the image {Path(path).name} is no longer available ({error.strerror}); attach it again",
            path,
        ) from None


def to_chat_message(turn: Turn) -> gateway_pb2.ChatMessage:
    parts = [gateway_pb2.ContentPart(image=gateway_pb2.Image(data=_read_image(p))) for p in turn.images]
    if turn.text:
        parts.append(gateway_pb2.ContentPart(text=turn.text))
    return gateway_pb2.ChatMessage(role=ROLES[turn.role], content=parts)


@dataclass(frozen=True)
class Controls:
    """The values of the side controls for one request."""

    system_prompt: str = ""
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    max_tiles: int = 12
    use_thumbnail: bool = True


def tiling_options(controls: Controls) -> common_pb2.TilingOptions:
    return common_pb2.TilingOptions(max_tiles=int(controls.max_tiles), use_thumbnail=bool(controls.use_thumbnail))


def normalized(turns: Sequence[Turn]) -> list[Turn]:
    """Empty turns dropped (a reply that was only an error note) and neighbours of one role merged, so
    roles alternate as chat templates expect."""
    out: list[Turn] = []
    for turn in turns:
        if turn.role == "system" or (not turn.text.strip() and not turn.images):
            continue
        if out and out[-1].role == turn.role:
            last = out[-1]
            out[-1] = Turn(last.role, "\n".join(t for t in (last.text, turn.text) if t), [*last.images, *turn.images])
        else:
            out.append(Turn(turn.role, turn.text, list(turn.images)))
    return out


def build_request(turns: Sequence[Turn], controls: Controls, request_id: str) -> gateway_pb2.ChatRequest:
    messages = []
    if controls.system_prompt.strip():
        messages.append(
            gateway_pb2.ChatMessage(
                role=common_pb2.ROLE_SYSTEM, content=[gateway_pb2.ContentPart(text=controls.system_prompt.strip())]
            )
        )
    messages.extend(to_chat_message(t) for t in normalized(turns))
    sampling = common_pb2.SamplingParams(
        temperature=float(controls.temperature),
        top_p=float(controls.top_p),
        max_new_tokens=int(controls.max_new_tokens),
    )
    return gateway_pb2.ChatRequest(
        messages=messages, sampling=sampling, tiling=tiling_options(controls), request_id=request_id
    )
