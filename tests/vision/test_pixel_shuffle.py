"""Pixel shuffle v1 / v2 pinned against a reference-style implementation and against transformers."""

from __future__ import annotations

import pytest
import torch
from ivl_vision.pixel_shuffle import pixel_shuffle
from transformers.models.internvl.modeling_internvl import InternVLModel


def reference_style(tokens: torch.Tensor, scale: float, ps_version: str) -> torch.Tensor:
    """The InternVL reference's steps, written out: (n, w, h, c) view, swap, view, swap back for v2."""
    n, count, c = tokens.shape
    h = w = int(count**0.5)
    x = tokens.reshape(n, h, w, c)
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if ps_version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(n, -1, x.shape[-1])


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
@pytest.mark.parametrize(("side", "channels"), [(32, 8), (4, 3), (8, 16)])
def test_matches_the_reference_steps(ps_version: str, side: int, channels: int) -> None:
    tokens = torch.randn(3, side * side, channels)
    assert torch.equal(pixel_shuffle(tokens, 0.5, ps_version), reference_style(tokens, 0.5, ps_version))


def test_v2_is_transformers_native_pixel_shuffle() -> None:
    tokens = torch.randn(2, 32 * 32, 8)
    native = InternVLModel.pixel_shuffle(None, tokens.reshape(2, 32, 32, 8), scale_factor=0.5).reshape(2, 256, 32)
    assert torch.equal(pixel_shuffle(tokens, 0.5, "v2"), native)


def test_v1_is_v2_with_each_tile_grid_transposed() -> None:
    tokens = torch.randn(2, 32 * 32, 8)
    v1 = pixel_shuffle(tokens, 0.5, "v1").reshape(2, 16, 16, 32)
    v2 = pixel_shuffle(tokens, 0.5, "v2").reshape(2, 16, 16, 32)
    assert torch.equal(v1.transpose(1, 2), v2)
    assert not torch.equal(v1, v2)


def test_which_patches_each_token_holds() -> None:
    # patch (r, c) of the 32x32 grid carries the value 1000 * r + c in its single channel
    rows = torch.arange(32).repeat_interleave(32)
    cols = torch.arange(32).repeat(32)
    tokens = (1000 * rows + cols).to(torch.float64).reshape(1, 1024, 1)
    v2 = pixel_shuffle(tokens, 0.5, "v2")[0]
    v1 = pixel_shuffle(tokens, 0.5, "v1")[0]
    # v2: token i*16 + j holds the 2x2 block at patch rows 2i..2i+1, cols 2j..2j+1
    assert sorted(v2[1 * 16 + 5].tolist()) == [2010, 2011, 3010, 3011]
    # v1: token i*16 + j holds the block at patch rows 2j..2j+1, cols 2i..2i+1 (transposed)
    assert sorted(v1[1 * 16 + 5].tolist()) == [10002, 10003, 11002, 11003]


def test_rejects_a_grid_that_does_not_fold() -> None:
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.randn(1, 30, 4), 0.5, "v2")
    with pytest.raises(ValueError, match="ps_version"):
        pixel_shuffle(torch.randn(1, 16, 4), 0.5, "v3")
