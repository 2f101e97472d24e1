"""Tile-grid previews: the dynamic-tiling grid drawn on an image, and a caption saying how it was cut
(grid, tiles, thumbnail, visual tokens). Pure PIL, no model code; decoding untrusted bytes safely is
preview_render.py's job, running it off the event loop preview_pool.py's."""

from __future__ import annotations

from ivl_proto.common.v1 import common_pb2
from PIL import Image, ImageDraw, ImageFont, ImageOps

PREVIEW_MAX_SIDE = 512
GRID_COLOR = (255, 64, 32)


def plan_caption(plan: common_pb2.ImagePlan, index: int | None = None) -> str:
    """e.g. 'image 1: 3×2 grid = 6 tiles + thumbnail = 7 tiles · 1792 visual tokens · 1200×800 → 1344×896'."""
    grid_tiles = plan.grid_cols * plan.grid_rows
    tiles = f"{plan.grid_cols}×{plan.grid_rows} grid = {grid_tiles} tile{'s' if grid_tiles != 1 else ''}"
    if plan.has_thumbnail:
        tiles += f" + thumbnail = {plan.num_tiles} tiles"
    size = f"{plan.original_width}×{plan.original_height} → {plan.resize_width}×{plan.resize_height}"
    prefix = f"image {index}: " if index is not None else ""
    return f"{prefix}{tiles} · {plan.num_tokens} visual tokens · {size}"


def draw_grid(image: Image.Image, plan: common_pb2.ImagePlan, max_side: int = PREVIEW_MAX_SIDE) -> Image.Image:
    """A copy of the image, scaled to fit max_side, with the tile boundaries and numbers drawn.
    The model stretches the image to grid_cols×448 by grid_rows×448, so in the original's
    coordinates the tiles are equal slices of width/cols and height/rows."""
    picture = ImageOps.exif_transpose(image).convert("RGB")
    picture.thumbnail((max_side, max_side))
    width, height = picture.size
    cols, rows = max(plan.grid_cols, 1), max(plan.grid_rows, 1)
    draw = ImageDraw.Draw(picture)
    line = max(2, round(min(width, height) / 150))
    for c in range(1, cols):
        x = round(c * width / cols)
        draw.line([(x, 0), (x, height)], fill=GRID_COLOR, width=line)
    for r in range(1, rows):
        y = round(r * height / rows)
        draw.line([(0, y), (width, y)], fill=GRID_COLOR, width=line)
    draw.rectangle([(0, 0), (width - 1, height - 1)], outline=GRID_COLOR, width=line)
    if cols * rows <= 40:
        font = ImageFont.load_default(size=max(12, min(width // cols, height // rows) // 5))
        for r in range(rows):
            for c in range(cols):
                x, y = round(c * width / cols) + line + 2, round(r * height / rows) + line
                label = str(r * cols + c + 1)
                box = draw.textbbox((x, y), label, font=font)
                draw.rectangle([box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2], fill=(0, 0, 0))
                draw.text((x, y), label, fill=(255, 255, 255), font=font)
    return picture
