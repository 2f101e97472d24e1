"""The UI's example images (frontend/ivl_frontend/examples/): what the demo model can do, drawn the way
the training images are, one of them small text in a large image that needs the tiles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ivl_train.fonts import CJK_FACES, LATIN_FACES, check_fonts, load_font
from ivl_train.synth import COLORS, QUESTION_CHINESE, QUESTION_COLOR, QUESTION_TEXT


@dataclass(frozen=True)
class UIExample:
    file_name: str
    question: str
    answer: str


EXAMPLES = (
    UIExample("printed-word.png", QUESTION_TEXT, "hello"),
    UIExample("orange-shape.png", QUESTION_COLOR, "orange"),
    UIExample("chinese-word.png", QUESTION_CHINESE, "你好"),
    UIExample("small-text-needs-tiles.png", QUESTION_TEXT, "tiles"),
)


def _centered(image: Image.Image, text: str, font_path: Path, size: int, ink: tuple[int, int, int],
              at: tuple[float, float] = (0.5, 0.5)) -> None:
    font = load_font(font_path, size)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = at[0] * image.width - (right - left) / 2 - left
    y = at[1] * image.height - (bottom - top) / 2 - top
    draw.text((x, y), text, font=font, fill=ink)


def draw_example(example: UIExample) -> Image.Image:
    if example.file_name == "printed-word.png":
        image = Image.new("RGB", (960, 540), (245, 240, 228))
        _centered(image, example.answer, LATIN_FACES[1].path, 150, (30, 40, 60))
    elif example.file_name == "orange-shape.png":
        image = Image.new("RGB", (800, 600), (70, 74, 80))
        ImageDraw.Draw(image).ellipse([260, 160, 540, 440], fill=COLORS["orange"])
    elif example.file_name == "chinese-word.png":
        image = Image.new("RGB", (800, 500), (250, 248, 240))
        _centered(image, example.answer, CJK_FACES[0].path, 170, (150, 20, 20))
    else:  # small text: ~28 px high in a 1600x1200 picture, unreadable in the 448 px overview
        image = Image.new("RGB", (1600, 1200), (236, 240, 244))
        _centered(image, example.answer, LATIN_FACES[0].path, 38, (20, 30, 50), at=(0.3, 0.62))
    return image


def write_examples(out_dir: str | Path) -> list[Path]:
    check_fonts()
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for example in EXAMPLES:
        path = folder / example.file_name
        draw_example(example).save(path, format="PNG", optimize=True)
        paths.append(path)
    return paths
