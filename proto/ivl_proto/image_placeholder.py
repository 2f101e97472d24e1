"""The `<image>` placeholder rule, shared by the gateway (which writes it) and the LLM service (which expands it).

The reference's convention: a conversation with a single image gets "<image>\\n" before the text of its
message; with several images every image becomes "Image-K: <image>\\n" (K counts the images of the whole
conversation, 1-based), placed before the text of its message in order. The LLM service replaces each
placeholder, in order, by "<img>" + "<IMG_CONTEXT>" x rows + "</img>". Client text may not contain it.
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_PLACEHOLDER = "<image>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"


def placeholder_line(number: int, total_images: int) -> str:
    """The text that stands for image `number` (1-based) of a conversation with `total_images` images."""
    return f"{IMAGE_PLACEHOLDER}\n" if total_images == 1 else f"Image-{number}: {IMAGE_PLACEHOLDER}\n"


def count_placeholders(text: str) -> int:
    return text.count(IMAGE_PLACEHOLDER)


def expand_placeholders(text: str, rows: Sequence[int]) -> str:
    """Each placeholder, in order, -> "<img>" + "<IMG_CONTEXT>" x its image's embedding rows + "</img>"."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    out = [pieces[0]]
    for count, piece in zip(rows, pieces[1:], strict=True):
        out += [IMG_START_TOKEN, IMG_CONTEXT_TOKEN * count, IMG_END_TOKEN, piece]
    return "".join(out)
