"""The chat's example prompts: pictures the demo model answers (drawn by `python -m ivl_train examples`)."""

from __future__ import annotations

from pathlib import Path

from gradio.components.multimodal_textbox import MultimodalValue

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# (file, question): what the committed demo model can do (docs/demo_model.md); the second picture is wide and
# is cut into tiles.
EXAMPLES = (
    ("orange-shape.png", "What color is the shape?"),
    ("blue-triangle-wide.png", "What color is the shape?"),
)


def chat_examples() -> list[list[MultimodalValue | None]]:
    """The examples whose pictures are present (all of them in a source checkout or an installed wheel), in
    ChatInterface's shape when it has additional inputs: [message, *additional inputs] (None: left as set)."""
    return [
        [{"text": question, "files": [str(EXAMPLES_DIR / name)]}]
        for name, question in EXAMPLES
        if (EXAMPLES_DIR / name).is_file()
    ]
