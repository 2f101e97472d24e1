"""A stable fingerprint of the vision side of a model: configs + a sample of every loaded tensor.

Hashed (sha256, hex): the tower config, projector width/activation, ps_version, select_layer,
downsample_ratio, image size, the compute dtype, and for every loaded tensor (by its native
module name, so both checkpoint layouts of the same weights agree) its name, shape, dtype and
a strided sample of its bytes (SAMPLES elements, first and last included). Fast for 6B weights;
it changes when a config or a sampled weight changes. Not the layout, folder name or template.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping

import torch

from ivl_vision.checkpoint_config import VisionCheckpointConfig

SAMPLES = 1024
VERSION = "ivl-vision-fingerprint-v1"


def config_digest_input(config: VisionCheckpointConfig, dtype: str) -> bytes:
    described = {
        "version": VERSION,
        "tower": dataclasses.asdict(config.tower),
        "llm_hidden_size": config.llm_hidden_size,
        "projector_hidden_act": config.projector_hidden_act,
        "image_size": config.image_size,
        "ps_version": config.ps_version,
        "select_layer": config.select_layer,
        "downsample_ratio": config.downsample_ratio,
        "dtype": dtype,
    }
    return json.dumps(described, sort_keys=True).encode()


def tensor_sample(tensor: torch.Tensor, samples: int = SAMPLES) -> bytes:
    """Bytes of about `samples` evenly strided elements of the flattened tensor, plus its last one."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return b""
    stride = max(1, flat.numel() // samples)
    picked = torch.cat([flat[::stride], flat[-1:]]).contiguous().cpu()
    return picked.view(torch.uint8).numpy().tobytes()


def fingerprint(config: VisionCheckpointConfig, tensors: Mapping[str, torch.Tensor], dtype: str) -> str:
    digest = hashlib.sha256(config_digest_input(config, dtype))
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tuple(tensor.shape)}|{str(tensor.dtype).removeprefix('torch.')}\n".encode())
        digest.update(tensor_sample(tensor))
    return digest.hexdigest()
