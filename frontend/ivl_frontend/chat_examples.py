"""The chat's example prompts: pictures the demo model can read (drawn by `python -m ivl_train examples`)."""

from __future__ import annotations

from pathlib import Path

from gradio.components.multimodal_textbox import MultimodalValue

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# (file, question): a printed word, a coloured shape, a Chinese word, small text that needs the tiles.
EXAMPLES = (
    ("printed-word.png", "What is written in the image?"),
    ("orange-shape.png", "What color is the shape?"),
    ("chinese-word.png", "图中写的是什么？"),
    ("small-text-needs-tiles.png", "What is written in the image?"),
)


def chat_examples() -> list[MultimodalValue]:
    """The examples whose pictures are present (all of them in a source checkout or an installed wheel)."""
    return [
        {"text": question, "files": [str(EXAMPLES_DIR / name)]}
        for name, question in EXAMPLES
        if (EXAMPLES_DIR / name).is_file()
    ]
