"""`ivl-plan`: print the InternVL tile plan of images or sizes, one JSON object per line.

    ivl-plan photo.jpg scan.png            # header only: no pixel is decoded
    ivl-plan --size 1920x1080 --max-tiles 6
    -> {"grid": [3, 2], "num_tiles": 7, "resize": [1344, 896]}

Errors go to stderr and the exit status is 2 (the other inputs are still printed).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ivl_proto.errors import ServingError
from ivl_proto.tiling_limits import MAX_TILES_LIMIT

from ivl_vision.image_io import ImageLimits, probe_image_size
from ivl_vision.tiling import TilingConfig, plan_tiles

_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def _parser() -> argparse.ArgumentParser:
    defaults = TilingConfig()
    parser = argparse.ArgumentParser(
        prog="ivl-plan",
        description="Show how InternVL dynamic tiling splits an image: grid, tile count (with the "
        "thumbnail) and the size the image is resized to.",
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE_FILE", help="image files (header is read only)")
    parser.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="WxH",
        help="an image size instead of a file, e.g. 1920x1080 (repeatable)",
    )
    parser.add_argument(
        "--max-tiles",
        type=int,
        default=defaults.max_tiles,
        help=f"most grid tiles (1..{MAX_TILES_LIMIT}, default {defaults.max_tiles})",
    )
    parser.add_argument(
        "--min-tiles",
        type=int,
        default=defaults.min_tiles,
        help=f"fewest grid tiles (default {defaults.min_tiles})",
    )
    parser.add_argument("--no-thumbnail", action="store_true", help="do not add the thumbnail tile")
    parser.add_argument(
        "--image-size",
        type=int,
        default=defaults.image_size,
        help=f"tile side in pixels (default {defaults.image_size})",
    )
    parser.add_argument(
        "--no-exif-orientation",
        action="store_true",
        help="ignore the EXIF orientation of image files (as the reference code does)",
    )
    return parser


def _parse_size(text: str) -> tuple[int, int]:
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"--size {text!r} is not WIDTHxHEIGHT, e.g. 1920x1080")
    return int(match.group(1)), int(match.group(2))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.images and not args.size:
        parser.error("give at least one IMAGE_FILE or --size WxH")
    try:
        config = TilingConfig(
            image_size=args.image_size,
            min_tiles=args.min_tiles,
            max_tiles=args.max_tiles,
            use_thumbnail=not args.no_thumbnail,
        )
    except ServingError as error:
        print(f"ivl-plan: {error.message}", file=sys.stderr)
        return 2
    limits = ImageLimits(apply_exif_orientation=not args.no_exif_orientation)
    failed = False
    inputs = [("size", text) for text in args.size] + [("file", path) for path in args.images]
    for kind, value in inputs:
        try:
            if kind == "size":
                width, height = _parse_size(value)
            else:
                width, height = probe_image_size(Path(value).read_bytes(), limits)
            plan = plan_tiles(width, height, config)
        except (ServingError, ValueError, OSError) as error:
            reason = error.message if isinstance(error, ServingError) else str(error)
            print(f"ivl-plan: {value}: {reason}", file=sys.stderr)
            failed = True
            continue
        print(json.dumps(plan.to_json_dict()), flush=True)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
