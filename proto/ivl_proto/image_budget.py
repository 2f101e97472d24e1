"""A request's image budget and the one check of planned images against it (gateway and vision service).

The gateway knows the request-level limits (tiles per request, pixels per image, the LLM's context)
and what its cache hits already use; it sends the budget with EncodeImages, and the vision service
refuses from the image headers, before decoding anything. The gateway runs the same check once more
over every image of the request (cache hits, its own encodes and the ones it waited for).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ivl_proto.errors import ErrorCode, ServingError, invalid
from ivl_proto.vision.v1 import vision_pb2


@dataclass(frozen=True)
class PlannedImage:
    """What the budget needs to know of one image: a label for messages and its plan's totals."""

    label: str  # "image 2 (message 0)"
    width: int
    height: int
    num_tiles: int
    num_tokens: int


@dataclass(frozen=True)
class ImageBudget:
    """0 in a limit means none."""

    max_total_tiles: int = 0
    used_tiles: int = 0  # tiles of images outside this check (the gateway's cache hits)
    max_total_tokens: int = 0  # the LLM's context length
    used_tokens: int = 0
    max_image_pixels: int = 0

    def to_pb(self) -> vision_pb2.ImageBudget:
        return vision_pb2.ImageBudget(
            max_total_tiles=self.max_total_tiles, used_tiles=self.used_tiles, max_total_tokens=self.max_total_tokens,
            used_tokens=self.used_tokens, max_image_pixels=self.max_image_pixels,
        )

    @classmethod
    def from_pb(cls, budget: vision_pb2.ImageBudget) -> ImageBudget:
        values = (budget.max_total_tiles, budget.used_tiles, budget.max_total_tokens, budget.used_tokens,
                  budget.max_image_pixels)
        if min(values) < 0:
            raise invalid(f"the image budget has a negative value: {values}")
        return cls(*values)


def check_images(images: Sequence[PlannedImage], budget: ImageBudget) -> None:
    """PAYLOAD_TOO_LARGE for an image over the pixel limit; INVALID_ARGUMENT when all images together need
    more tiles than the request may have, or more visual tokens than the model's context holds."""
    for image in images:
        pixels = image.width * image.height
        if budget.max_image_pixels and pixels > budget.max_image_pixels:
            raise ServingError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"{image.label}: image is {image.width}x{image.height} = {pixels / 1e6:.1f} MP; the limit is "
                f"{budget.max_image_pixels / 1e6:.1f} MP per image",
            )
    tiles = budget.used_tiles + sum(image.num_tiles for image in images)
    if budget.max_total_tiles and tiles > budget.max_total_tiles:
        raise invalid(
            f"the images of this request need {tiles} tiles; the limit is {budget.max_total_tiles} tiles per "
            "request: send fewer images or lower max_tiles"
        )
    tokens = budget.used_tokens + sum(image.num_tokens for image in images)
    if budget.max_total_tokens and tokens >= budget.max_total_tokens:
        raise invalid(
            f"the images of this request need {tokens} tokens; the model's context is {budget.max_total_tokens} "
            "tokens: send fewer images or lower max_tiles"
        )
