"""InternVL's pixel shuffle: fold each 2x2 neighbourhood of the ViT patch grid into one token.

ps_version "v2" gives the tokens row-major (transformers' native InternVL does the same);
"v1" (InternVL-Chat-V1-5 era checkpoints) skips the reference's last swap of the two grid axes,
so each tile's token grid comes out transposed.
"""

from __future__ import annotations

import torch

PS_VERSIONS = ("v1", "v2")


def pixel_shuffle(features: torch.Tensor, downsample_ratio: float, ps_version: str) -> torch.Tensor:
    """(N, side*side, C) patch tokens -> (N, (side*r)^2, C/r^2) tokens, r = downsample_ratio."""
    if ps_version not in PS_VERSIONS:
        raise ValueError(f"ps_version must be 'v1' or 'v2'; got {ps_version!r}")
    batch, tokens, channels = features.shape
    side = round(tokens**0.5)
    fold = round(1 / downsample_ratio)
    if side * side != tokens or side % fold:
        raise ValueError(f"{tokens} patch tokens do not form a square grid divisible by {fold}")
    out_side = side // fold
    # (N, side, side, C) -> group `fold` neighbours along the second axis into the channels
    grid = features.reshape(batch, side, out_side, channels * fold)
    # swap axes, then group `fold` neighbours along the other axis
    grid = grid.permute(0, 2, 1, 3).reshape(batch, out_side, out_side, channels * fold * fold)
    if ps_version == "v2":
        grid = grid.permute(0, 2, 1, 3)
    return grid.reshape(batch, out_side * out_side, channels * fold * fold)
