"""Reads a checkpoint folder's config.json (either layout) into what the vision side needs.

Tolerant of extra fields (real releases carry many); strict on the fields the encoder needs,
with an error that names the field and the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ivl_proto.checkpoint_layout import detect_layout, read_checkpoint_config
from ivl_proto.errors import ErrorCode, ServingError


@dataclass(frozen=True)
class VisionTowerConfig:
    """The InternViT tower in the terms of transformers' InternVLVisionConfig."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    norm_type: str  # "layer_norm" | "rms_norm"
    use_qk_norm: bool
    attention_bias: bool
    layer_norm_eps: float
    hidden_act: str
    image_size: int  # the size the position embeddings were trained for
    patch_size: int
    num_channels: int


@dataclass(frozen=True)
class VisionCheckpointConfig:
    """Everything config.json says about the vision tower, the projector and the tiling defaults."""

    layout: str  # "original" | "native"
    tower: VisionTowerConfig
    llm_hidden_size: int
    projector_hidden_act: str
    image_size: int  # tile size fed to the tower (force_image_size in the original layout)
    ps_version: str
    select_layer: int
    downsample_ratio: float
    template: str
    max_dynamic_patch: int
    min_dynamic_patch: int
    use_thumbnail: bool
    dynamic_image_size: bool

    @property
    def flavour(self) -> str:
        """"6b" for the RMSNorm + qk-norm tower (InternViT-6B style), else "300m"."""
        return "6b" if self.tower.use_qk_norm or self.tower.norm_type == "rms_norm" else "300m"

    @property
    def tokens_per_tile(self) -> int:
        side = self.image_size // self.tower.patch_size
        return int(side * self.downsample_ratio) ** 2

    @property
    def layers_to_run(self) -> int:
        """Tower layers whose output is used: select_layer -k -> hidden_states[-k] of N + 1 states."""
        layers = self.tower.num_hidden_layers
        return layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer


def declared_dtype(folder: Path) -> str | None:
    """The dtype the checkpoint's config.json declares (torch_dtype / dtype, top level or the LLM's), if any."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (raw, raw.get("llm_config") or {}, raw.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, str):
                return value.removeprefix("torch.")
    return None


def read_config(folder: Path) -> VisionCheckpointConfig:
    path = folder / "config.json"
    raw = read_checkpoint_config(folder)
    config = _original(raw, path) if detect_layout(raw, path) == "original" else _native(raw, path, folder)
    _validate(config, path)
    return config


def _need(section: dict[str, Any], key: str, where: str, path: Path) -> Any:
    if key not in section or section[key] is None:
        raise ServingError(ErrorCode.FAILED_PRECONDITION, f"{path}: {where} has no '{key}', which the vision encoder needs")
    return section[key]


def _size(value: Any) -> int:
    return int(value[0]) if isinstance(value, list | tuple) else int(value)


def _original(raw: dict[str, Any], path: Path) -> VisionCheckpointConfig:
    vision = _need(raw, "vision_config", "the top level", path)
    llm = _need(raw, "llm_config", "the top level", path)
    where = "vision_config"
    # Defaults below are those of the reference InternVisionConfig / InternVLChatConfig classes.
    tower = VisionTowerConfig(
        hidden_size=int(_need(vision, "hidden_size", where, path)),
        num_hidden_layers=int(_need(vision, "num_hidden_layers", where, path)),
        num_attention_heads=int(_need(vision, "num_attention_heads", where, path)),
        intermediate_size=int(_need(vision, "intermediate_size", where, path)),
        norm_type=str(vision.get("norm_type", "rms_norm")),
        use_qk_norm=bool(vision.get("qk_normalization", True)),
        attention_bias=bool(vision.get("qkv_bias", False)),
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
        hidden_act=str(vision.get("hidden_act", "gelu")),
        image_size=_size(vision.get("image_size", 224)),
        patch_size=_size(vision.get("patch_size", 14)),
        num_channels=int(vision.get("num_channels", 3)),
    )
    return VisionCheckpointConfig(
        layout="original",
        tower=tower,
        llm_hidden_size=int(_need(llm, "hidden_size", "llm_config", path)),
        projector_hidden_act="gelu",
        image_size=int(raw.get("force_image_size") or tower.image_size),
        ps_version=str(raw.get("ps_version", "v1")),
        select_layer=int(raw.get("select_layer", -1)),
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        template=str(raw.get("template") or ""),
        max_dynamic_patch=int(raw.get("max_dynamic_patch", 6)),
        min_dynamic_patch=int(raw.get("min_dynamic_patch", 1)),
        use_thumbnail=bool(raw.get("use_thumbnail", False)),
        dynamic_image_size=bool(raw.get("dynamic_image_size", False)),
    )


def _native(raw: dict[str, Any], path: Path, folder: Path) -> VisionCheckpointConfig:
    vision = _need(raw, "vision_config", "the top level", path)
    text = _need(raw, "text_config", "the top level", path)
    where = "vision_config"
    # Defaults below are those of transformers' InternVLVisionConfig / InternVLConfig.
    tower = VisionTowerConfig(
        hidden_size=int(_need(vision, "hidden_size", where, path)),
        num_hidden_layers=int(_need(vision, "num_hidden_layers", where, path)),
        num_attention_heads=int(_need(vision, "num_attention_heads", where, path)),
        intermediate_size=int(_need(vision, "intermediate_size", where, path)),
        norm_type=str(vision.get("norm_type", "layer_norm")),
        use_qk_norm=bool(vision.get("use_qk_norm", False)),
        attention_bias=bool(vision.get("attention_bias", False)),
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
        hidden_act=str(vision.get("hidden_act", "gelu")),
        image_size=_size(vision.get("image_size", 448)),
        patch_size=_size(vision.get("patch_size", 14)),
        num_channels=int(vision.get("num_channels", 3)),
    )
    if not vision.get("use_mean_pooling", True):
        raise ServingError(ErrorCode.FAILED_PRECONDITION, f"{path}: vision_config.use_mean_pooling false (a final "
                           "LayerNorm after the tower) is not an InternVL layout this encoder supports")
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ServingError(ErrorCode.FAILED_PRECONDITION, f"{path}: vision_feature_select_strategy {strategy!r} "
                           "is not supported; InternVL drops the CLS token ('default')")
    layer = raw.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ServingError(ErrorCode.FAILED_PRECONDITION, f"{path}: vision_feature_layer {layer!r} is not one layer index")
    tiling = _native_tiling(folder)
    return VisionCheckpointConfig(
        layout="native",
        tower=tower,
        llm_hidden_size=int(_need(text, "hidden_size", "text_config", path)),
        projector_hidden_act=str(raw.get("projector_hidden_act", "gelu")),
        image_size=tower.image_size,
        ps_version=str(raw.get("ps_version", "v2")),  # transformers' own pixel shuffle is v2
        select_layer=layer,
        downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
        template=str(raw.get("template") or ""),
        max_dynamic_patch=int(tiling.get("max_patches", 12)),
        min_dynamic_patch=int(tiling.get("min_patches", 1)),
        use_thumbnail=True,
        dynamic_image_size=bool(tiling.get("crop_to_patches", True)),
    )


def _native_tiling(folder: Path) -> dict[str, Any]:
    """The -hf releases keep their tiling defaults in preprocessor_config.json (GotOcr2 image processor)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _validate(config: VisionCheckpointConfig, path: Path) -> None:
    tower = config.tower
    problems = []
    if config.ps_version not in ("v1", "v2"):
        problems.append(f"ps_version {config.ps_version!r} is not 'v1' or 'v2'")
    if tower.norm_type not in ("layer_norm", "rms_norm"):
        problems.append(f"vision norm_type {tower.norm_type!r} is not 'layer_norm' or 'rms_norm'")
    if tower.hidden_size % tower.num_attention_heads:
        problems.append(f"vision hidden_size {tower.hidden_size} is not divisible by {tower.num_attention_heads} heads")
    if config.image_size % tower.patch_size:
        problems.append(f"image size {config.image_size} is not a multiple of patch size {tower.patch_size}")
    fold = 1 / config.downsample_ratio if config.downsample_ratio > 0 else 0
    if fold <= 0 or abs(fold - round(fold)) > 1e-9 or (config.image_size // tower.patch_size) % round(fold):
        problems.append(f"downsample_ratio {config.downsample_ratio} does not fold the patch grid evenly")
    if not 0 <= config.layers_to_run <= tower.num_hidden_layers:
        problems.append(f"select_layer {config.select_layer} is outside a tower of {tower.num_hidden_layers} layers")
    if problems:
        raise ServingError(ErrorCode.FAILED_PRECONDITION, f"{path}: " + "; ".join(problems))


def synthetic_config(
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    llm_hidden_size: int,
    flavour: str = "300m",
    ps_version: str = "v2",
) -> VisionCheckpointConfig:
    """A config without a checkpoint (benchmarks, random weights): InternViT-300M or -6B style."""
    big = flavour == "6b"
    tower = VisionTowerConfig(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, norm_type="rms_norm" if big else "layer_norm", use_qk_norm=big,
        attention_bias=not big, layer_norm_eps=1e-6, hidden_act="gelu", image_size=448, patch_size=14, num_channels=3,
    )
    return VisionCheckpointConfig(
        layout="random", tower=tower, llm_hidden_size=llm_hidden_size, projector_hidden_act="gelu", image_size=448,
        ps_version=ps_version, select_layer=-1, downsample_ratio=0.5, template="", max_dynamic_patch=12,
        min_dynamic_patch=1, use_thumbnail=True, dynamic_image_size=True,
    )
