"""The one reader of a checkpoint folder's config.json and the one rule that tells its layout, for both
model services (the vision service reads the vision tower + projector, the LLM service the language model).

- "original": the OpenGVLab layout (architectures ["InternVLChatModel"], `vision_config` + `llm_config`,
  keys `vision_model.*`, `mlp1.*`, `language_model.*`);
- "native": the transformers-native layout (InternVLForConditionalGeneration / InternVLModel,
  `vision_config` + `text_config`, keys `vision_tower.*`, `multi_modal_projector.*`, `language_model.*`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from ivl_proto.errors import ErrorCode, ServingError

Layout = Literal["original", "native"]
ORIGINAL_ARCHITECTURES = ("InternVLChatModel",)
NATIVE_ARCHITECTURES = ("InternVLForConditionalGeneration", "InternVLModel")


def read_checkpoint_config(folder: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint folder as a dict; NOT_FOUND / FAILED_PRECONDITION with the path otherwise."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise ServingError(ErrorCode.NOT_FOUND, f"model path {folder} is not a folder")
    if not path.is_file():
        raise ServingError(ErrorCode.NOT_FOUND, f"{folder} has no config.json; is it an InternVL checkpoint folder?")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ServingError(ErrorCode.FAILED_PRECONDITION, f"cannot read {path}: {error}") from error
    if not isinstance(raw, dict):
        raise ServingError(ErrorCode.FAILED_PRECONDITION, f"{path} is not a JSON object")
    return raw


def detect_layout(raw: dict[str, Any], path: str | Path = "config.json") -> Layout:
    """The layout a config.json describes: by its architectures, else by its sections (llm_config is the
    original layout's, text_config the native one's); FAILED_PRECONDITION naming the file otherwise."""
    architectures = raw.get("architectures") or []
    if any(a in ORIGINAL_ARCHITECTURES for a in architectures):
        return "original"
    if any(a in NATIVE_ARCHITECTURES for a in architectures):
        return "native"
    if "llm_config" in raw:
        return "original"
    if "text_config" in raw:
        return "native"
    raise ServingError(
        ErrorCode.FAILED_PRECONDITION,
        f"{path} is neither an OpenGVLab InternVL config (architectures InternVLChatModel, vision_config + "
        f"llm_config) nor a transformers-native one (InternVLForConditionalGeneration, vision_config + "
        f"text_config); architectures={architectures}",
    )
