"""One optimizer step's examples -> padded micro-batches of similar length, the loss and exact-match counts.

Examples of a step are sorted by length and packed into micro-batches whose padded size stays under a
token budget (a 13-tile example is ~900 tokens, a one-tile one ~130), so padding costs little.
Exact match under teacher forcing (every answer token and the end-of-turn token is the argmax) is
exactly "greedy decoding reproduces the answer", so training logs the accuracy the evaluation measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ivl_train.data import Example
from ivl_train.prompts import IGNORE


@dataclass
class MicroBatch:
    examples: list[Example]
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor  # (tiles of all examples, 3, S, S), in example order


def pack(examples: Sequence[Example], pad_id: int, token_budget: int) -> list[MicroBatch]:
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    groups: list[list[Example]] = []
    for example in ordered:
        length = len(example.input_ids)
        if groups and (len(groups[-1]) + 1) * length <= token_budget:
            groups[-1].append(example)
        else:
            groups.append([example])
    return [_collate(group, pad_id) for group in groups]


def pad_sequences(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, labels) of each sequence -> right-padded (input_ids, attention_mask, labels), each (B, T)."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(sequences):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(row_labels)
    return input_ids, mask, labels


def _collate(group: list[Example], pad_id: int) -> MicroBatch:
    ids, mask, labels = pad_sequences([(e.input_ids, e.labels) for e in group], pad_id)
    pixels = torch.cat([e.pixel_values for e in group])
    return MicroBatch(group, ids, mask, labels, pixels)


@dataclass
class StepResult:
    loss_sum: float
    label_tokens: int
    correct: dict[str, int]  # kind -> examples whose whole answer is the argmax
    seen: dict[str, int]


def forward(model: torch.nn.Module, batch: MicroBatch) -> torch.Tensor:
    return forward_with_features(model, batch)[0]


def forward_with_features(model: torch.nn.Module, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM logits, the vision tower's patch outputs (tiles, patches, hidden), CLS dropped) of one forward."""
    captured: list[torch.Tensor] = []
    hook = model.model.vision_tower.register_forward_hook(
        lambda _m, _i, out: captured.append(out.last_hidden_state[:, 1:])
    )
    try:
        out = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
            use_cache=False,
        )
    finally:
        hook.remove()
    return out.logits, captured[0]


def loss_and_matches(logits: torch.Tensor, batch: MicroBatch) -> tuple[torch.Tensor, int, list[bool]]:
    """Summed cross-entropy over the label tokens, their count, and per example whether all of its
    last reply's tokens are the argmax (the greedy answer)."""
    return label_loss_and_matches(logits, batch.labels)


def label_loss_and_matches(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, list[bool]]:
    """loss_and_matches for logits (B, T, V) and labels (B, T) of the same rows."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    count = int((targets != IGNORE).sum())
    predicted = shifted.argmax(-1)
    matches = []
    for row in range(targets.shape[0]):
        positions = (targets[row] != IGNORE).nonzero().flatten()
        last = _last_run(positions)
        matches.append(bool((predicted[row, last] == targets[row, last]).all()))
    return loss, count, matches


def _last_run(positions: torch.Tensor) -> torch.Tensor:
    """The last contiguous run of label positions: the final assistant reply."""
    if positions.numel() == 0:
        return positions
    breaks = (positions[1:] - positions[:-1] != 1).nonzero().flatten()
    start = int(breaks[-1]) + 1 if breaks.numel() else 0
    return positions[start:]
