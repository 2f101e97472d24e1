"""The tiling limits every part checks (UI, gateway, vision service), and the reference demo's tile budget rule.

InternVL 1.5 cuts an image into 1..40 tiles of 448 px (docs/tiling.md); a request's options are checked
here with the same messages wherever they arrive.
"""

from __future__ import annotations

from ivl_proto.errors import invalid

MAX_TILES_LIMIT = 40  # the most tiles of one image (InternVL 1.5's dynamic resolution)


def check_tile_counts(max_tiles: int | None, min_tiles: int | None, limit: int = MAX_TILES_LIMIT) -> None:
    """INVALID_ARGUMENT unless 1 <= max_tiles <= limit and 1 <= min_tiles <= max_tiles (None = not given;
    a min_tiles without max_tiles is checked against the limit)."""
    if max_tiles is not None and not 1 <= max_tiles <= limit:
        raise invalid(f"max_tiles is {max_tiles}; it must be between 1 and {limit}")
    if min_tiles is not None:
        upper = max_tiles if max_tiles is not None else limit
        if not 1 <= min_tiles <= upper:
            bound = f"max_tiles ({max_tiles})" if max_tiles is not None else str(limit)
            raise invalid(f"min_tiles is {min_tiles}; it must be between 1 and {bound}")


def tiles_per_image(max_tiles: int, images_in_message: int) -> int:
    """The reference demo's split of a message's tile budget: each of its n images gets max(1, max_tiles // n)."""
    return max(1, max_tiles // max(1, images_in_message))
