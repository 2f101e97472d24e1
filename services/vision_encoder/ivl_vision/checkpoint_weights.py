"""Reads only the vision tower + projector tensors of a checkpoint, in either layout.

The index (model.safetensors.index.json) says which shard holds which key, so only the shards
holding vision/projector tensors are opened, and only the needed keys are read from them.
Original-layout names are mapped onto the encoder's native module names; the fused vision
attn.qkv is split in three equal row chunks (q, k, v).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from ivl_proto.errors import ErrorCode, ServingError
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_LAYER = r"^vision_tower\.encoder\.layer\.(\d+)\."
_ORIGINAL_RULES = (
    (r"^vision_tower\.embeddings\.cls_token$", r"vision_model.embeddings.class_embedding"),
    (r"^vision_tower\.embeddings\.position_embeddings$", r"vision_model.embeddings.position_embedding"),
    (r"^vision_tower\.embeddings\.patch_embeddings\.projection\.(\w+)$", r"vision_model.embeddings.patch_embedding.\1"),
    (_LAYER + r"lambda_([12])$", r"vision_model.encoder.layers.\1.ls\2"),
    (_LAYER + r"attention\.projection_layer\.(\w+)$", r"vision_model.encoder.layers.\1.attn.proj.\2"),
    (_LAYER + r"attention\.(q_norm|k_norm)\.(\w+)$", r"vision_model.encoder.layers.\1.attn.\2.\3"),
    (_LAYER + r"mlp\.(fc1|fc2)\.(\w+)$", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (_LAYER + r"layernorm_before\.(\w+)$", r"vision_model.encoder.layers.\1.norm1.\2"),
    (_LAYER + r"layernorm_after\.(\w+)$", r"vision_model.encoder.layers.\1.norm2.\2"),
    (r"^multi_modal_projector\.layer_norm\.(\w+)$", r"mlp1.0.\1"),
    (r"^multi_modal_projector\.linear_1\.(\w+)$", r"mlp1.1.\1"),
    (r"^multi_modal_projector\.linear_2\.(\w+)$", r"mlp1.3.\1"),
)
_ORIGINAL_QKV = re.compile(_LAYER + r"attention\.([qkv])_proj\.(weight|bias)$")
_NATIVE_PREFIXES = ("model.", "")  # transformers 5 saves model.vision_tower.*, the -hf releases vision_tower.*


@dataclass(frozen=True)
class TensorSource:
    """Where a module tensor comes from: a checkpoint key, optionally one of its equal row chunks."""

    key: str
    chunk: int | None = None  # 0, 1, 2 -> q, k, v rows of a fused qkv
    chunks: int = 1


def weight_map(folder: Path) -> dict[str, str]:
    """Checkpoint key -> shard file name, from the index or from a single model.safetensors."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            raise ServingError(ErrorCode.FAILED_PRECONDITION, f"cannot read the weight map of {index}: {error}") from error
        return {str(key): str(file) for key, file in mapping.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), SINGLE_FILE)
    raise ServingError(
        ErrorCode.NOT_FOUND,
        f"{folder} has neither {INDEX_NAME} nor {SINGLE_FILE}; only safetensors checkpoints are supported",
    )


def sources_for(names: Iterable[str], layout: str, available: dict[str, str]) -> dict[str, TensorSource]:
    """Module tensor name -> its checkpoint source, for the given layout."""
    if layout == "original":
        return {name: _original_source(name) for name in names}
    prefix = next(
        (p for p in _NATIVE_PREFIXES if any(key.startswith(p + "vision_tower.") for key in available)), "model."
    )
    return {name: TensorSource(prefix + name) for name in names}


def _original_source(name: str) -> TensorSource:
    if match := _ORIGINAL_QKV.match(name):
        layer, part, kind = match.groups()
        return TensorSource(f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}", "qkv".index(part), 3)
    for pattern, replacement in _ORIGINAL_RULES:
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return TensorSource(renamed)
    raise ServingError(ErrorCode.INTERNAL, f"no original-layout checkpoint name is known for module tensor {name}")


def read_tensors(
    folder: Path, sources: dict[str, TensorSource], available: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Read each needed checkpoint key once, opening only the shards that hold them."""
    by_file: dict[str, set[str]] = {}
    for name, source in sources.items():
        if source.key not in available:
            raise ServingError(
                ErrorCode.FAILED_PRECONDITION,
                f"checkpoint {folder} lacks tensor '{source.key}' (needed for {name}); "
                f"{INDEX_NAME if (folder / INDEX_NAME).is_file() else SINGLE_FILE} does not list it",
            )
        by_file.setdefault(available[source.key], set()).add(source.key)
    raw: dict[str, torch.Tensor] = {}
    for file_name, keys in sorted(by_file.items()):
        path = folder / file_name
        if not path.is_file():
            example = sorted(keys)[0]
            raise ServingError(
                ErrorCode.FAILED_PRECONDITION,
                f"shard {path} is missing; the index says it holds '{example}' and {len(keys) - 1} other vision tensors",
            )
        with safe_open(str(path), framework="pt") as handle:
            present = set(handle.keys())
            for key in sorted(keys):
                if key not in present:
                    raise ServingError(
                        ErrorCode.FAILED_PRECONDITION,
                        f"shard {path} does not hold tensor '{key}', though {INDEX_NAME} says it does",
                    )
                raw[key] = handle.get_tensor(key)
    out: dict[str, torch.Tensor] = {}
    for name, source in sources.items():
        tensor = raw[source.key]
        if source.chunk is not None:
            if tensor.shape[0] % source.chunks:
                raise ServingError(
                    ErrorCode.FAILED_PRECONDITION,
                    f"tensor '{source.key}' in {folder / available[source.key]} has {tensor.shape[0]} rows, "
                    f"not divisible into {source.chunks} (q, k, v)",
                )
            tensor = tensor.chunk(source.chunks, dim=0)[source.chunk]
        out[name] = tensor
    return out
