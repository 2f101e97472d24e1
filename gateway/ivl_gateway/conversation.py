"""A chat conversation as the gateway sees it: validation, `<image>` placeholders and the tile budget.

Placeholders (the reference's convention): a conversation with a single image gets "<image>\\n" before
the text of its message; with several images, every image becomes "Image-K: <image>\\n" (K counts the
images of the whole conversation, 1-based, so "Image-3" means the same image in every later turn),
placed before the text of its message in order.

Tile budget (the reference demo's rule): the images of the latest user message share the request's
max_tiles: each gets max(1, max_tiles // n). Earlier messages' images keep the tiling they were
encoded with (remembered in the cache), so a later turn finds them; without a memory (no Redis, or
expired), the same rule is applied to their own message, which gives the same answer as long as the
client keeps its tiling options.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ErrorCode, ServingError, invalid
from ivl_proto.image_placeholder import IMAGE_PLACEHOLDER, placeholder_line
from ivl_proto.llm.v1 import llm_pb2
from ivl_proto.tiling_limits import MAX_TILES_LIMIT, check_tile_counts, tiles_per_image

from ivl_gateway.embedding_codec import TilingChoice

_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates: not encodable as UTF-8
ROLE_NAMES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
}


@dataclass(frozen=True)
class ImagePart:
    """An image with tiling options of its own (the OpenAI `detail`); unset fields: the request's."""

    data: bytes
    tiling: common_pb2.TilingOptions | None = None


@dataclass
class ChatMessage:
    """One message; `parts` are text strings and images (bytes, or ImagePart with own tiling), in order."""

    role: int  # common_pb2.Role
    parts: list[str | bytes | ImagePart] = field(default_factory=list)


@dataclass(frozen=True)
class ChatImage:
    data: bytes
    message_index: int
    image_index: int  # among all images of the request
    tiling: common_pb2.TilingOptions | None = None  # this image's own options (over the request's)


@dataclass
class ChatTurn:
    """One chat turn, API-independent: what chat.ChatService runs."""

    messages: list[ChatMessage]
    sampling: common_pb2.SamplingParams
    tiling: common_pb2.TilingOptions
    request_id: str = ""
    user: str = ""  # the OpenAI `user` (an end-user id): on the turn's log line and trace span


@dataclass(frozen=True)
class TurnLimits:
    max_images: int
    max_text_chars: int


def collect_images(turn: ChatTurn, limits: TurnLimits) -> list[ChatImage]:
    """Validate the messages and list their images in order."""
    if not turn.messages:
        raise invalid("messages is empty: send at least one user message")
    if turn.messages[-1].role != common_pb2.ROLE_USER:
        raise invalid("the last message must be a user message")
    check_tiling_options(turn.tiling)
    images: list[ChatImage] = []
    chars = 0
    for m_index, message in enumerate(turn.messages):
        if message.role not in ROLE_NAMES:
            raise invalid(f"message {m_index} has no valid role (system, user or assistant)")
        if message.role == common_pb2.ROLE_SYSTEM and m_index != 0:
            raise invalid(f"message {m_index}: a system message is only allowed first")
        for part in message.parts:
            if isinstance(part, bytes | ImagePart):
                data, own = (part.data, part.tiling) if isinstance(part, ImagePart) else (part, None)
                if message.role != common_pb2.ROLE_USER:
                    raise invalid(f"message {m_index}: images are only allowed in user messages")
                if not data:
                    raise invalid(f"message {m_index}: image {len(images)} is empty (0 bytes)")
                if own is not None:
                    check_tiling_options(own)
                images.append(ChatImage(data, m_index, len(images), own))
            else:
                found = _SURROGATE.search(part)
                if found is not None:
                    raise invalid(
                        f"message {m_index} contains a lone surrogate (U+{ord(found.group()):04X}); "
                        "text must be valid Unicode"
                    )
                if IMAGE_PLACEHOLDER in part:
                    raise invalid(
                        f"message {m_index}: text contains the reserved placeholder {IMAGE_PLACEHOLDER!r}; "
                        "send images as image parts instead"
                    )
                chars += len(part)
    if len(images) > limits.max_images:
        raise invalid(f"the request has {len(images)} images; the limit is {limits.max_images} images per request")
    if chars > limits.max_text_chars:
        raise invalid(f"the request has {chars} characters of text; the limit is {limits.max_text_chars}")
    return images


def llm_messages(turn: ChatTurn, total_images: int) -> list[llm_pb2.Message]:
    """The conversation with images replaced by `<image>` placeholders (see the module docstring)."""
    result: list[llm_pb2.Message] = []
    counter = 0
    for message in turn.messages:
        prefix: list[str] = []
        texts: list[str] = []
        for part in message.parts:
            if isinstance(part, bytes | ImagePart):
                counter += 1
                prefix.append(placeholder_line(counter, total_images))
            else:
                texts.append(part)
        result.append(llm_pb2.Message(role=message.role, content="".join(prefix) + "".join(texts)))
    return result


def check_image_bytes(images: list[ChatImage], max_image_bytes: int) -> None:
    """The vision service's per-image byte limit (its Info.max_image_bytes; 0 = none), checked before
    sending: a 413 naming the image and the limit."""
    for image in images:
        if max_image_bytes and len(image.data) > max_image_bytes:
            raise ServingError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"image {image.image_index} (message {image.message_index}) is {_byte_size(len(image.data))}; "
                f"the limit is {_byte_size(max_image_bytes)} per image",
            )


def _byte_size(size: int) -> str:
    return f"{size} bytes ({size / 2**20:.1f} MiB)" if size >= 2**17 else f"{size} bytes"


def check_tiling_options(options: common_pb2.TilingOptions, max_tiles_limit: int = MAX_TILES_LIMIT) -> None:
    """The request's tiling options in range, whether or not it has images."""
    check_tile_counts(options.max_tiles if options.HasField("max_tiles") else None,
                      options.min_tiles if options.HasField("min_tiles") else None, max_tiles_limit)


def resolve_tiling(
    requested: common_pb2.TilingOptions,
    defaults: TilingChoice,
    max_tiles_limit: int,
) -> TilingChoice:
    """The request's options over the defaults, validated (max_tiles 1..limit, 1 <= min <= max)."""
    max_tiles = requested.max_tiles if requested.HasField("max_tiles") else defaults.max_tiles
    check_tile_counts(max_tiles, None, max_tiles_limit)
    min_tiles = requested.min_tiles if requested.HasField("min_tiles") else min(defaults.min_tiles, max_tiles)
    check_tile_counts(max_tiles, min_tiles, max_tiles_limit)
    thumb = requested.use_thumbnail if requested.HasField("use_thumbnail") else defaults.use_thumbnail
    return TilingChoice(max_tiles, min_tiles, thumb)


def budget(tiling: TilingChoice, images_in_message: int) -> TilingChoice:
    """The reference demo's split of the tile budget over the images of one message."""
    per_image = tiles_per_image(tiling.max_tiles, images_in_message)
    return TilingChoice(per_image, min(tiling.min_tiles, per_image), tiling.use_thumbnail)


def tiling_per_image(
    images: list[ChatImage], tiling: TilingChoice, remembered: list[TilingChoice | None], latest: int
) -> list[TilingChoice]:
    """The tiling of each image: budget rule for message `latest`, remembered settings before it; an image with
    options of its own (OpenAI `detail`) gets them over the request's, outside the budget rule."""
    per_message: dict[int, int] = {}
    for image in images:
        per_message[image.message_index] = per_message.get(image.message_index, 0) + 1
    choices: list[TilingChoice] = []
    for image, memory in zip(images, remembered, strict=True):
        if image.message_index != latest and memory is not None:
            choices.append(memory)
        elif image.tiling is not None:
            choices.append(resolve_tiling(image.tiling, tiling, MAX_TILES_LIMIT))
        else:
            choices.append(budget(tiling, per_message[image.message_index]))
    return choices
