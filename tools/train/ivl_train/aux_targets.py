"""A training-only auxiliary loss: which character each patch of each tile shows.

An answer gives the model ~6 supervised tokens per image, and a from-scratch vision tower learns to read
slowly from that alone. We know where every character was printed, and the tiling plan says where it lands
in each 448 px tile and in that tile's 16x16 grid of 28 px patches. A head (LayerNorm + Linear) on the
tower's patch outputs learns "the character centred in this patch, or none" (a softmax over the
characters + "none"). It drives the vision pre-training stage (pages of printed words) and stays on, with
a smaller weight, beside the language-model loss. The head exists only in training: the exported
checkpoint is the plain InternVL model. Tiles where the text is too small to read (the overview of a
small-text image) or far larger than anything asked are left out of this loss, and so are the patches
that show part of a character but not its centre (neither "none" nor that character).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from ivl_vision.tiling import TilePlan
from torch import nn

from ivl_train.synth import CHINESE_WORDS, CharBox

AUX_CHARS = tuple(sorted(set(string.ascii_lowercase + string.digits + "".join(CHINESE_WORDS))))
CHAR_INDEX = {char: i for i, char in enumerate(AUX_CHARS)}
NONE_CLASS = len(AUX_CHARS)  # the patch shows no character centre
AUX_CLASSES = len(AUX_CHARS) + 1
NONE_WEIGHT = 0.1  # most patches show none: weigh them down
READABLE_HEIGHT = (16.0, 140.0)  # ink height (px) in a tile outside which the tile is left out


@dataclass(frozen=True)
class AuxTargets:
    positives: tuple[tuple[int, int, int], ...]  # (tile, patch, character class) of this image
    ignored_tiles: tuple[int, ...]
    # (tile, patch) that show part of a character but not its centre: neither "none" nor that character
    ignored_patches: tuple[tuple[int, int], ...] = ()


def aux_targets(chars: Sequence[CharBox], plan: TilePlan, tile: int = 448, patch: int = 28) -> AuxTargets:
    side = tile // patch
    width, height = plan.original_width, plan.original_height
    views = [(0, plan.grid_cols, plan.grid_rows, plan.resize_width / width, plan.resize_height / height)]
    if plan.has_thumbnail:
        views.append((plan.grid_tiles, 1, 1, tile / width, tile / height))
    positives: dict[tuple[int, int], int] = {}
    covered: set[tuple[int, int]] = set()  # patches a character's ink overlaps off its centre
    ignored: set[int] = set()
    for first, cols, rows, sx, sy in views:
        for box in chars:
            if box.char not in CHAR_INDEX:
                continue
            x, y = box.cx * sx, box.cy * sy
            col, row = min(cols - 1, max(0, int(x // tile))), min(rows - 1, max(0, int(y // tile)))
            index = first + row * cols + col
            if not READABLE_HEIGHT[0] <= box.height * sy <= READABLE_HEIGHT[1]:
                ignored.add(index)
                continue
            u = min(side - 1, max(0, int((x - col * tile) // patch)))
            v = min(side - 1, max(0, int((y - row * tile) // patch)))
            positives.setdefault((index, v * side + u), CHAR_INDEX[box.char])  # the first one wins
            half_w, half_h = box.width * sx * 0.4, box.height * sy * 0.4
            for vv in range(int((y - half_h - row * tile) // patch), int((y + half_h - row * tile) // patch) + 1):
                for uu in range(int((x - half_w - col * tile) // patch), int((x + half_w - col * tile) // patch) + 1):
                    if 0 <= uu < side and 0 <= vv < side:
                        covered.add((index, vv * side + uu))
    kept = tuple(sorted((t, p, c) for (t, p), c in positives.items() if t not in ignored))
    unsure = tuple(sorted((t, p) for t, p in covered - positives.keys() if t not in ignored))
    return AuxTargets(kept, tuple(sorted(ignored)), unsure)


def offset_targets(parts: Sequence[tuple[AuxTargets, int]]) -> AuxTargets:
    """Targets of several images seen one after the other: (targets, tiles of that image) in order."""
    positives: list[tuple[int, int, int]] = []
    ignored: list[int] = []
    unsure: list[tuple[int, int]] = []
    offset = 0
    for targets, tiles in parts:
        positives += [(offset + t, p, c) for t, p, c in targets.positives]
        ignored += [offset + t for t in targets.ignored_tiles]
        unsure += [(offset + t, p) for t, p in targets.ignored_patches]
        offset += tiles
    return AuxTargets(tuple(positives), tuple(ignored), tuple(unsure))


class PatchHead(nn.Module):
    """LayerNorm + a GELU MLP: tower patch outputs (tiles, patches, hidden) -> character logits.

    Not a linear probe: with LayerNorm + Linear the per-character accuracy of a from-scratch tower stayed at
    ~5 % (chance) for 800 steps, while with this head it was 22 % after 500 steps of 4 pages (the tower's
    blocks start near identity; the head gives the patch embedding a non-linear reader to learn against)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.hidden = nn.Linear(hidden, 4 * hidden)
        self.linear = nn.Linear(4 * hidden, AUX_CLASSES)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.linear(F.gelu(self.hidden(self.norm(patches))))


def patch_labels(targets: AuxTargets, tiles: int, patches: int) -> torch.Tensor:
    labels = torch.full((tiles, patches), NONE_CLASS, dtype=torch.long)
    for tile, patch in targets.ignored_patches:
        labels[tile, patch] = -100
    for tile, patch, cls in targets.positives:
        labels[tile, patch] = cls
    for tile in targets.ignored_tiles:
        labels[tile] = -100
    return labels


def aux_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(weighted cross-entropy over the patches not ignored, characters, characters recognised)."""
    if not (labels != -100).any():
        return logits.sum() * 0.0, 0, 0
    weight = torch.ones(AUX_CLASSES, dtype=logits.dtype)
    weight[NONE_CLASS] = NONE_WEIGHT
    loss = F.cross_entropy(logits.reshape(-1, AUX_CLASSES), labels.reshape(-1), weight=weight, ignore_index=-100)
    with torch.no_grad():
        chars = (labels != -100) & (labels != NONE_CLASS)
        hits = int(((logits[..., :NONE_CLASS].argmax(-1) == labels) & chars).sum())
    return loss, int(chars.sum()), hits
