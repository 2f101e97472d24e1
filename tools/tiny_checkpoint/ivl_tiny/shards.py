"""Sharded safetensors + model.safetensors.index.json, vision/projector and LLM in separate shards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def _split(names: list[str], tensors: dict[str, torch.Tensor], parts: int) -> list[list[str]]:
    sizes = [tensors[name].numel() * tensors[name].element_size() for name in names]
    total = max(sum(sizes), 1)
    groups: list[list[str]] = [[] for _ in range(parts)]
    running = 0
    for name, size in zip(names, sizes, strict=True):
        index = min(parts - 1, int(running * parts / total))
        groups[index].append(name)
        running += size
    return [group for group in groups if group]


def write_sharded(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    is_llm: dict[str, bool],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    min_llm_shards: int = 2,
) -> dict[str, str]:
    """Write the shards and the index; returns the weight map (tensor name -> shard file name)."""
    vision_names = [name for name in tensors if not is_llm[name]]
    llm_names = [name for name in tensors if is_llm[name]]

    def count(names: list[str], minimum: int) -> int:
        nbytes = sum(tensors[name].numel() * tensors[name].element_size() for name in names)
        return max(minimum, math.ceil(nbytes / max_shard_bytes)) if names else 0

    groups = _split(vision_names, tensors, count(vision_names, 1)) + _split(
        llm_names, tensors, count(llm_names, min_llm_shards)
    )
    weight_map: dict[str, str] = {}
    total_size = 0
    for number, group in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: tensors[name] for name in group}, str(folder / file_name), metadata={"format": "pt"})
        (folder / file_name).chmod(0o644)
        for name in group:
            weight_map[name] = file_name
            total_size += tensors[name].numel() * tensors[name].element_size()
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
