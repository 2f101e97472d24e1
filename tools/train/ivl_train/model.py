"""The demo model's architecture: the real InternVL one, small (ivl_tiny's TinySpec sizes + our tokenizer).

InternViT-300M-style tower (LayerNorm, qkv bias, layer scale) on 448 px tiles with 28 px patches
(16x16 patches -> pixel shuffle v2 -> 8x8 = 64 tokens per tile), mlp1, a Qwen2 LLM, the
"internvl2_5" template. Trained as transformers' InternVLForConditionalGeneration (the all-in-one
model); exported in the original OpenGVLab layout by export.py.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from ivl_tiny import TinySpec
from ivl_tiny.native_model import build_native_config, padded_vocab_size
from ivl_tiny.tokenizer import SpecialTokenIds, special_token_ids
from transformers import InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast

# The sizes the committed demo model was trained with (python -m ivl_train train --preset demo).
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "vision_hidden": 192, "vision_layers": 6, "vision_heads": 3, "vision_intermediate": 768,
        "patch_size": 28,
        "llm_hidden": 256, "llm_layers": 4, "llm_heads": 4, "llm_kv_heads": 2, "llm_intermediate": 1024,
        "max_position_embeddings": 4096,
    },
    # cheaper towers for tuning runs
    "p32": {
        "vision_hidden": 192, "vision_layers": 6, "vision_heads": 3, "vision_intermediate": 768,
        "patch_size": 32,
        "llm_hidden": 256, "llm_layers": 4, "llm_heads": 4, "llm_kv_heads": 2, "llm_intermediate": 1024,
        "max_position_embeddings": 4096,
    },
    "p32-narrow": {
        "vision_hidden": 128, "vision_layers": 5, "vision_heads": 2, "vision_intermediate": 512,
        "patch_size": 32,
        "llm_hidden": 256, "llm_layers": 3, "llm_heads": 4, "llm_kv_heads": 2, "llm_intermediate": 768,
        "max_position_embeddings": 4096,
    },
    "fast": {
        "vision_hidden": 128, "vision_layers": 3, "vision_heads": 2, "vision_intermediate": 512,
        "patch_size": 28,
        "llm_hidden": 192, "llm_layers": 3, "llm_heads": 3, "llm_kv_heads": 1, "llm_intermediate": 576,
        "max_position_embeddings": 4096,
    },
    # a few seconds per step: tests and smoke runs
    "smoke": {
        "vision_hidden": 32, "vision_layers": 1, "vision_heads": 2, "vision_intermediate": 64, "patch_size": 28,
        "llm_hidden": 64, "llm_layers": 1, "llm_heads": 2, "llm_kv_heads": 1, "llm_intermediate": 128,
        "max_position_embeddings": 4096,
    },
}
TEMPLATE = "internvl2_5"
LAYER_SCALE_INIT = 0.1  # InternViT's own initial layer scale (the tiny writer uses 1.0 for its random weights)


def demo_spec(preset: str = "demo", seed: int = 0) -> TinySpec:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(PRESETS)}")
    return TinySpec(vision="300m", llm="qwen2", ps_version="v2", template=TEMPLATE, seed=seed, **PRESETS[preset])


def spec_to_json(spec: TinySpec) -> dict[str, Any]:
    return asdict(spec)


def spec_from_json(fields: dict[str, Any]) -> TinySpec:
    return TinySpec(**fields)


def native_config(spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> tuple[InternVLConfig, SpecialTokenIds]:
    ids = special_token_ids(tokenizer)
    config = build_native_config(spec, ids, padded_vocab_size(len(tokenizer), spec.vocab_multiple))
    config.vision_config.layer_scale_init_value = LAYER_SCALE_INIT
    config.dtype = "float32"
    return config, ids


def build_model(spec: TinySpec, tokenizer: PreTrainedTokenizerFast) -> InternVLForConditionalGeneration:
    """A freshly initialised all-in-one model (transformers' own init, seeded by spec.seed)."""
    config, _ = native_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = InternVLForConditionalGeneration(config)
    return model.float()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pca_patch_init(model: InternVLForConditionalGeneration, tiles: torch.Tensor, eps: float = 1e-2) -> None:
    """Data-dependent init of the patch embedding: the top principal components of real training patches,
    whitened (each output channel starts with unit variance and decorrelated), instead of random filters.
    A from-scratch ViT on little data learns much faster from there.

    tiles: (N, 3, S, S) normalised tiles as the vision service makes them."""
    projection = model.model.vision_tower.embeddings.patch_embeddings.projection
    hidden, channels, patch, _ = projection.weight.shape
    n, _, size, _ = tiles.shape
    side = size // patch
    patches = tiles.reshape(n, channels, side, patch, side, patch).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(-1, channels * patch * patch).double()
    mean = patches.mean(0)
    centered = patches - mean
    covariance = centered.T @ centered / max(1, centered.shape[0] - 1)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    top_values, top_vectors = values.flip(0)[:hidden], vectors.flip(1)[:, :hidden]
    weight = (top_vectors / torch.sqrt(top_values.clamp_min(0) + eps)).T  # (hidden, C*P*P)
    with torch.no_grad():
        projection.weight.copy_(weight.reshape(hidden, channels, patch, patch).float())
        projection.bias.copy_((-(weight @ mean)).float())


def sincos_position_init(model: InternVLForConditionalGeneration) -> None:
    """2-D sine-cosine position embeddings (as MAE initialises them) instead of zeros, so attention can
    tell neighbouring patches apart from the first step. They stay trainable; the CLS position is zero."""
    embeddings = model.model.vision_tower.embeddings.position_embeddings  # (1, 1 + side*side, hidden)
    hidden = embeddings.shape[-1]
    side = round((embeddings.shape[1] - 1) ** 0.5)
    quarter = hidden // 4
    frequencies = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for axis in (rows.flatten(), cols.flatten()):
        angles = axis[:, None] * frequencies[None, :]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    if table.shape[1] < hidden:
        table = torch.cat([table, torch.zeros(table.shape[0], hidden - table.shape[1], dtype=table.dtype)], dim=1)
    with torch.no_grad():
        embeddings[0, 0].zero_()
        embeddings[0, 1:].copy_(table.float() * 0.5)
