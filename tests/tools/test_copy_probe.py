"""ivl_train's copy probe (copy_probe.py): the synthetic visual tokens hold the word where the layout says,
and a short run on the smoke-sized model trains the real mlp1 + LLM through the real chat template."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
from ivl_train.copy_probe import ALPHABET, NONE, ProbeConfig, draw_grid, run_probe, shuffled_tokens
from ivl_train.model import demo_spec


def test_the_word_sits_in_consecutive_cells_of_one_row():
    for seed in range(50):
        grid = draw_grid(random.Random(seed), 8)
        rows, cols = (grid.cells != NONE).nonzero(as_tuple=True)
        assert 3 <= len(grid.word) <= 8
        assert len(set(rows.tolist())) == 1
        assert cols.tolist() == list(range(int(cols[0]), int(cols[0]) + len(grid.word)))
        assert "".join(ALPHABET[int(i)] for i in grid.cells[rows, cols]) == grid.word


def test_token_layout_gives_each_visual_token_its_cells_code():
    grid = draw_grid(random.Random(3), 8)
    codes = torch.randn(len(ALPHABET) + 1, 12)
    tokens = shuffled_tokens(grid, codes, "token", 8)
    assert tokens.shape == (64, 12)
    assert torch.equal(tokens, codes[grid.cells.reshape(-1)])


def test_patch_layout_joins_two_by_two_patches_into_a_token():
    grid = draw_grid(random.Random(4), 16)
    codes = torch.randn(len(ALPHABET) + 1, 5)
    tokens = shuffled_tokens(grid, codes, "patch", 8)
    assert tokens.shape == (64, 20)
    for row in range(8):
        for col in range(8):
            quad = [grid.cells[2 * row + dr, 2 * col + dc] for dr in (0, 1) for dc in (0, 1)]
            assert torch.equal(tokens[row * 8 + col], torch.cat([codes[int(i)] for i in quad]))


def test_a_short_run_trains_and_logs(tmp_path):
    log = tmp_path / "probe.jsonl"
    history = run_probe(ProbeConfig(preset="smoke", steps=40, batch=8, lr=3e-3, warmup=10, threads=1,
                                    log_every=5), str(log))
    assert [r["step"] for r in history] == [5, 10, 15, 20, 25, 30, 35, 40]
    # the answer format (the alphabet, the end of turn) is learned at once: the loss leaves ln(vocabulary)
    assert history[-1]["loss"] < history[0]["loss"] - 1.0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in lines] == [r["step"] for r in history] and lines[0]["layout"] == "token"


def test_an_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="unknown layout 'rows'"):
        ProbeConfig(layout="rows")


def test_patch_layout_at_ratio_one_is_one_patch_per_token():
    grid = draw_grid(random.Random(5), 16)
    codes = torch.randn(len(ALPHABET) + 1, 5)
    tokens = shuffled_tokens(grid, codes, "patch", 16, fold=1)
    assert tokens.shape == (256, 5)
    assert torch.equal(tokens, shuffled_tokens(grid, codes, "token", 16))


def test_a_run_at_ratio_one_feeds_256_tokens_per_tile():
    assert replace(demo_spec("smoke"), downsample_ratio=1.0).tokens_per_tile == 256  # what the sequences hold
    history = run_probe(ProbeConfig(preset="smoke", steps=4, batch=2, warmup=2, threads=1, log_every=2,
                                    downsample_ratio=1.0))
    assert [r["step"] for r in history] == [2, 4] and all(r["loss"] > 0 for r in history)


def test_a_ratio_that_does_not_fold_the_grid_is_refused():
    with pytest.raises(ValueError, match=r"downsample_ratio 0\.3 is not"):
        ProbeConfig(downsample_ratio=0.3)
