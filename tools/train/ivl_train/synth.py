"""Synthetic bilingual training and evaluation images, drawn on the fly from a random.Random.

Five kinds, each with its fixed question and exact answer:
- text:    a random lowercase string of 3-8 letters, printed large (readable in the 448 px overview)
- number:  a random number of 2-6 digits, printed large
- color:   one shape in one of eight colours ("What color is the shape?" -> the colour word)
- chinese: a common Chinese word, printed large ("图中写的是什么？" -> the word)
- small:   a short lowercase string printed ~26-32 px high in a large image: unreadable in the 448 px
           overview (thumbnail) but readable in the 448 px tiles of a 2x2 .. 4x3 grid

Printed text: DejaVu Sans / DejaVu Serif / Liberation Sans, regular and bold (WenQuanYi Micro Hei for
Chinese), dark on light or light on dark, anywhere in the image; image sides 448-1600 px.
Sizes are chosen in the coordinates the model sees: "large" text is 30-52 px tall in the 448x448
overview the tiler makes of the whole image; "small" text is that tall only in the tiles.
"""

from __future__ import annotations

import functools
import math
import random
import string
from dataclasses import dataclass

from ivl_vision.tiling import TilingConfig, plan_tiles
from PIL import Image, ImageDraw

from ivl_train.fonts import CJK_FACES, LATIN_FACES, FontFace, load_font

TILE = 448
KINDS = ("text", "number", "color", "chinese", "small")
QUESTION_TEXT = "What is written in the image?"
QUESTION_COLOR = "What color is the shape?"
QUESTION_CHINESE = "图中写的是什么？"
QUESTIONS = {
    "text": QUESTION_TEXT, "number": QUESTION_TEXT, "small": QUESTION_TEXT,
    "color": QUESTION_COLOR, "chinese": QUESTION_CHINESE,
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 30),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
    "purple": (140, 40, 180),
}
SHAPES = ("circle", "square", "rectangle", "triangle", "ellipse", "diamond")
# Common two-character words (the model learns these 64; held-out images show them anew).
CHINESE_WORDS = (
    "中国", "北京", "上海", "你好", "谢谢", "学生", "老师", "朋友", "时间", "工作", "电脑", "手机",
    "天气", "今天", "明天", "苹果", "水果", "火车", "飞机", "医生", "音乐", "电影", "学校", "汽车",
    "春天", "夏天", "秋天", "冬天", "太阳", "月亮", "世界", "和平", "快乐", "生日", "家人", "熊猫",
    "早上", "晚上", "米饭", "面条", "咖啡", "牛奶", "银行", "医院", "商店", "公园", "城市", "国家",
    "语言", "汉字", "文化", "历史", "科学", "数学", "地图", "欢迎", "再见", "名字", "眼睛", "大海",
    "森林", "动物", "老虎", "图片",
)
# Large text: height of the letters (ascender to baseline) in the 448x448 overview of the image.
LARGE_HEIGHT_IN_VIEW = (30.0, 52.0)
MIN_GLYPH_WIDTH_IN_VIEW = 24.0  # the overview squeezes wide images: keep letters ~ a 28 px patch wide in it
SMALL_HEIGHT = (26.0, 32.0)  # small text: letter height in the original image, px
# Small text grids (cols, rows, max_tiles): the overview shrinks the text 2-4x, the tiles keep it.
SMALL_GRIDS = ((2, 2, 4), (3, 2, 6), (3, 3, 9), (4, 3, 12))
SMALL_GRID_WEIGHTS = (0.35, 0.3, 0.1, 0.25)
SMALL_EVAL_SIZE = (1600, 1200)


@dataclass(frozen=True)
class CharBox:
    """Where one printed character sits in the image (training's auxiliary per-patch targets)."""

    char: str
    cx: float
    cy: float
    height: float  # ink height of the printed line, px
    width: float = 0.0  # advance width of the character, px


@dataclass(frozen=True)
class Sample:
    kind: str
    image: Image.Image
    question: str
    answer: str
    max_tiles: int  # the tile budget the sample is meant to be seen with (training); eval overrides it
    chars: tuple[CharBox, ...] = ()


def image_size(rng: random.Random) -> tuple[int, int]:
    """Sides of 448-1600 px, aspect ratio within 1:2 .. 2:1 (the 448 px overview squeezes at most 2x)."""
    width = rng.randint(TILE, 1600)
    return width, rng.randint(max(TILE, width // 2), min(1600, width * 2))


def random_word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))


def random_number(rng: random.Random) -> str:
    digits = rng.randint(2, 6)
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _colors(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(background, ink): dark on light or light on dark, lightly tinted."""
    light = tuple(rng.randint(190, 255) for _ in range(3))
    dark = tuple(rng.randint(0, 80) for _ in range(3))
    return (light, dark) if rng.random() < 0.6 else (dark, light)  # type: ignore[return-value]


@functools.lru_cache(maxsize=64)
def _height_per_px(face: FontFace) -> float:
    """Letter height (ascender to baseline, the ink of 'h' / '中') per pixel of font size."""
    probe = "中" if face in CJK_FACES else "h"
    _left, top, _right, bottom = load_font(face.path, 200).getbbox(probe)
    return (bottom - top) / 200.0


def _face(rng: random.Random, chinese: bool) -> FontFace:
    return rng.choice(CJK_FACES if chinese else LATIN_FACES)


def _draw_text(image: Image.Image, text: str, face: FontFace, size: int, ink: tuple[int, int, int],
               rng: random.Random) -> tuple[CharBox, ...]:
    """Print `text` at a random place where it fits; returns each character's centre."""
    font = load_font(face.path, size)
    stroke = max(1, size // 28) if face.fake_bold else 0
    left, top, right, bottom = ImageDraw.Draw(image).textbbox((0, 0), text, font=font, stroke_width=stroke)
    x = rng.randint(0, max(0, image.width - (right - left) - 1)) - left
    y = rng.randint(0, max(0, image.height - (bottom - top) - 1)) - top
    ImageDraw.Draw(image).text((x, y), text, font=font, fill=ink, stroke_width=stroke, stroke_fill=ink)
    cy = y + (top + bottom) / 2
    boxes = []
    for i, char in enumerate(text):
        start, end = font.getlength(text[:i]), font.getlength(text[: i + 1])
        boxes.append(CharBox(char, x + (start + end) / 2, cy, float(bottom - top), end - start))
    return tuple(boxes)


def printed_large(rng: random.Random, text: str, chinese: bool = False) -> tuple[Image.Image, tuple[CharBox, ...]]:
    """`text` printed so that the 448x448 overview shows it 32-80 px tall, on a 448-1600 px image."""
    face = _face(rng, chinese)
    per_px = _height_per_px(face)
    font_probe = load_font(face.path, 100)
    width_per_px = font_probe.getlength(text) / 100.0
    for _ in range(200):
        width, height = image_size(rng)
        sx, sy = TILE / width, TILE / height
        size = rng.uniform(*LARGE_HEIGHT_IN_VIEW) / (per_px * sy)
        text_width = width_per_px * size
        glyph_width_in_view = text_width / len(text) * sx
        if text_width <= 0.92 * width and glyph_width_in_view >= MIN_GLYPH_WIDTH_IN_VIEW and size * 1.3 < height:
            break
    else:  # a size that always fits: square image, medium text
        width = height = 900
        size = 0.92 * width / width_per_px * 0.6
    background, ink = _colors(rng)
    image = Image.new("RGB", (width, height), background)
    return image, _draw_text(image, text, face, max(8, round(size)), ink, rng)


def printed_small(
    rng: random.Random, text: str, size_wh: tuple[int, int] | None = None
) -> tuple[Image.Image, int, tuple[CharBox, ...]]:
    """`text` ~26-32 px high in a large image; returns (image, max_tiles that keeps it readable, boxes).

    size_wh fixes the image size (evaluation: 1600x1200); else a 2x2 .. 4x3 grid is drawn and the image
    is 85-100 % of its 448 px tiles wide and high, so the tiles show the text at 1.0-1.18x.
    """
    if size_wh is None:
        cols, rows, max_tiles = rng.choices(SMALL_GRIDS, weights=SMALL_GRID_WEIGHTS)[0]
        scale = rng.uniform(0.85, 1.0)
        width = round(cols * TILE * scale * rng.uniform(0.97, 1.03))
        height = round(rows * TILE * scale * rng.uniform(0.97, 1.03))
    else:
        (width, height), max_tiles = size_wh, 12
    face = _face(rng, chinese=False)
    size = rng.uniform(*SMALL_HEIGHT) / _height_per_px(face)
    background, ink = _colors(rng)
    image = Image.new("RGB", (width, height), background)
    return image, max_tiles, _draw_text(image, text, face, round(size), ink, rng)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _background_for(shape_rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, int, int]:
    """A greyish background far from the shape's colour (so the shape is the only coloured thing)."""
    for _ in range(100):
        grey = rng.randint(0, 255)
        candidate = tuple(min(255, max(0, grey + rng.randint(-12, 12))) for _ in range(3))
        if math.dist(candidate, shape_rgb) >= 110:
            return candidate  # type: ignore[return-value]
    return (128, 128, 128)


def colored_shape(rng: random.Random, color: str) -> Image.Image:
    width, height = image_size(rng)
    rgb = _jitter(COLORS[color], rng)
    image = Image.new("RGB", (width, height), _background_for(rgb, rng))
    side = rng.uniform(0.2, 0.6) * min(width, height)
    w = side * (rng.uniform(1.3, 1.9) if rng.random() < 0.5 else 1.0)
    h = side
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    box = [x0, y0, x0 + w, y0 + h]
    draw = ImageDraw.Draw(image)
    shape = rng.choice(SHAPES)
    if shape in ("circle", "ellipse"):
        draw.ellipse(box if shape == "ellipse" else [x0, y0, x0 + h, y0 + h], fill=rgb)
    elif shape in ("square", "rectangle"):
        draw.rectangle(box if shape == "rectangle" else [x0, y0, x0 + h, y0 + h], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(x0 + w / 2, y0), (x0, y0 + h), (x0 + w, y0 + h)], fill=rgb)
    else:
        draw.polygon([(x0 + w / 2, y0), (x0 + w, y0 + h / 2), (x0 + w / 2, y0 + h), (x0, y0 + h / 2)], fill=rgb)
    return image


# Training: the tile budgets large samples are seen with (the overview is always the last tile).
LARGE_MAX_TILES = (1, 2, 4, 6, 12)
LARGE_MAX_TILES_WEIGHTS = (0.4, 0.15, 0.15, 0.15, 0.15)


def make_sample(
    kind: str,
    rng: random.Random,
    small_size: tuple[int, int] | None = None,
    large_tile_weights: tuple[float, ...] = LARGE_MAX_TILES_WEIGHTS,
) -> Sample:
    """One sample of `kind`. Evaluation passes small_size=(1600, 1200) for the small-text set.
    large_tile_weights: the chance of each LARGE_MAX_TILES budget for the large kinds."""
    question = QUESTIONS[kind]
    max_tiles = rng.choices(LARGE_MAX_TILES, weights=large_tile_weights)[0]
    chars: tuple[CharBox, ...] = ()
    if kind == "text":
        answer = random_word(rng)
        image, chars = printed_large(rng, answer)
    elif kind == "number":
        answer = random_number(rng)
        image, chars = printed_large(rng, answer)
    elif kind == "chinese":
        answer = rng.choice(CHINESE_WORDS)
        image, chars = printed_large(rng, answer, chinese=True)
    elif kind == "color":
        answer = rng.choice(list(COLORS))
        image = colored_shape(rng, answer)
    elif kind == "small":
        answer = random_word(rng)
        image, max_tiles, chars = printed_small(rng, answer, small_size)
    else:
        raise ValueError(f"unknown sample kind {kind!r}; known: {', '.join(KINDS)}")
    return Sample(kind, image, question, answer, max_tiles, chars)


# Vision pre-training pages: several words per image, each character's centre known (aux_targets.py).
PAGE_WORDS = (20, 60)  # attempts; dense pages give the per-patch loss many characters per tile
PAGE_HEIGHT_IN_VIEW = (26.0, 52.0)  # letter height in the view the page is tiled into


def _page_word(rng: random.Random) -> tuple[str, bool]:
    roll = rng.random()
    if roll < 0.55:
        return random_word(rng), False
    if roll < 0.8:
        return random_number(rng), False
    return rng.choice(CHINESE_WORDS), True


def text_page(rng: random.Random, max_tiles: int) -> tuple[Image.Image, tuple[CharBox, ...]]:
    """An image with up to 30 non-overlapping printed words/numbers/Chinese words; letters are 26-52 px tall
    in the tiles the image is cut into with `max_tiles` (the 448 px overview when max_tiles is 1)."""
    width, height = image_size(rng)
    plan = plan_tiles(width, height, TilingConfig(max_tiles=max_tiles))
    view_x, view_y = plan.resize_width / width, plan.resize_height / height
    background, ink = _colors(rng)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float, float]] = []
    boxes: list[CharBox] = []
    for _ in range(rng.randint(*PAGE_WORDS)):
        text, chinese = _page_word(rng)
        face = _face(rng, chinese)
        size = rng.uniform(*PAGE_HEIGHT_IN_VIEW) / view_y / _height_per_px(face)
        glyph_width = load_font(face.path, 100).getlength(text) / 100.0 / len(text)
        size = max(8, round(max(size, MIN_GLYPH_WIDTH_IN_VIEW / view_x / glyph_width)))
        font = load_font(face.path, size)
        stroke = max(1, size // 28) if face.fake_bold else 0
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
        w, h = right - left, bottom - top
        if w >= width or h >= height:
            continue
        for _attempt in range(10):
            x0, y0 = rng.randint(0, width - w - 1), rng.randint(0, height - h - 1)
            box = (x0 - 6, y0 - 6, x0 + w + 6, y0 + h + 6)
            if all(box[2] < p[0] or box[0] > p[2] or box[3] < p[1] or box[1] > p[3] for p in placed):
                break
        else:
            continue
        placed.append(box)
        x, y = x0 - left, y0 - top
        draw.text((x, y), text, font=font, fill=ink, stroke_width=stroke, stroke_fill=ink)
        for i, char in enumerate(text):
            start, end = font.getlength(text[:i]), font.getlength(text[: i + 1])
            boxes.append(CharBox(char, x + (start + end) / 2, y + (top + bottom) / 2, float(h), end - start))
    return image, tuple(boxes)
