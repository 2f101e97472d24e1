"""The UI's example images (frontend/ivl_frontend/examples/): what the committed demo model can do (name the
colour of a shape), drawn the way the training images are; one of them is wide and cut into 3 tiles + the
overview."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ivl_train.fonts import check_fonts
from ivl_train.synth import COLORS, QUESTION_COLOR


@dataclass(frozen=True)
class UIExample:
    file_name: str
    question: str
    answer: str


EXAMPLES = (
    UIExample("orange-shape.png", QUESTION_COLOR, "orange"),
    UIExample("blue-triangle-wide.png", QUESTION_COLOR, "blue"),
)


def draw_example(example: UIExample) -> Image.Image:
    if example.file_name == "orange-shape.png":
        image = Image.new("RGB", (800, 600), (70, 74, 80))
        ImageDraw.Draw(image).ellipse([260, 160, 540, 440], fill=COLORS["orange"])
    elif example.file_name == "blue-triangle-wide.png":  # 1500x500: a 3x1 grid of tiles + the overview
        image = Image.new("RGB", (1500, 500), (200, 200, 196))
        ImageDraw.Draw(image).polygon([(1050, 80), (880, 420), (1220, 420)], fill=COLORS["blue"])
    else:
        raise ValueError(f"unknown example {example.file_name!r}")
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
