"""VisionModelInfo: what a loaded vision encoder is (served by Info, logged at start-up)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VisionModelInfo:
    model_id: str  # the checkpoint folder's name
    layout: str  # "original" | "native" | "random"
    llm_hidden_size: int  # width of the projector's output (the LLM's hidden size)
    vision_hidden_size: int
    image_size: int  # tile side in pixels (448)
    patch_size: int
    tokens_per_tile: int  # 256 for 448 px tiles, patch 14, downsample 0.5
    ps_version: str
    select_layer: int
    downsample_ratio: float
    template: str  # the chat template named by config.json ("" when it names none)
    flavour: str  # "300m" (LayerNorm + qkv bias) | "6b" (RMSNorm + qk-norm)
    default_max_tiles: int
    default_min_tiles: int
    use_thumbnail: bool
    dynamic_image_size: bool
    dtype: str  # "float32" | "bfloat16" | "float16"
    device: str
    fingerprint: str  # hex digest of configs + weights (see ivl_vision.fingerprint)
    vision_layers_run: int  # tower layers actually run (select_layer may stop early)
