"""A probe of the demo model's language half: can its LLM learn to copy a word out of ideal visual tokens?

Reading needs two things: the vision tower must tell which character each part of a tile shows, and the
LLM must learn to read those visual tokens out in order. This probe takes the tower away. Each example is
one 448 px tile's 64 visual tokens, made synthetically with one word of 3-8 characters in one row,
anywhere, and nothing elsewhere. The tokens go through the model's real mlp1 and LLM with the stack's
real chat template ("What is written in the image?"), and only the answer is learned. Every example is
new, so the exact match of a window of steps is a held-out figure.

`layout` says how the characters sit in the visual tokens, in the space the tower hands to pixel
shuffle:
- "token": one character per visual token (a 56 px cell of the tile). Each token is a fixed random
  code of its character, the size of the whole shuffled token.
- "patch": one character per 28 px patch, so two per visual token. Pixel shuffle joins 2x2 patches,
  and each patch is a fixed random code of its character. This is what text about one patch wide
  per letter gives.
Codes get Gaussian noise (`noise` x their own scale) so that no two tokens are identical.

`downsample_ratio` is the model's (0.5, InternVL's own: 8x8 = 64 tokens per tile of 16x16 28 px patches; 1.0:
pixel shuffle folds nothing, 16x16 = 256 tokens per tile, each one 28 px patch, the geometry 14 px patches
with ratio 0.5 would also give).
"""

from __future__ import annotations

import json
import random
import string
import time
from dataclasses import asdict, dataclass, replace

import torch
from ivl_llm.templates import get_template

from ivl_train.batching import label_loss_and_matches, pad_sequences
from ivl_train.model import TEMPLATE, build_model, demo_spec
from ivl_train.prompts import Turn, build_sequence
from ivl_train.synth import QUESTION_TEXT
from ivl_train.tokenizer import build_tokenizer

LAYOUTS = ("token", "patch")
ALPHABET = string.ascii_lowercase + string.digits
NONE = len(ALPHABET)  # the code of an empty cell


@dataclass(frozen=True)
class ProbeConfig:
    layout: str = "token"
    preset: str = "fast"
    steps: int = 1500
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 100
    noise: float = 0.3
    seed: int = 0
    threads: int = 2
    log_every: int = 100
    downsample_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; known: {', '.join(LAYOUTS)}")
        if self.downsample_ratio not in (0.25, 0.5, 1.0):
            raise ValueError(f"downsample_ratio {self.downsample_ratio} is not one of 0.25, 0.5, 1.0")


@dataclass(frozen=True)
class ProbeGrid:
    word: str
    cells: torch.Tensor  # (side, side) character index (NONE = empty) per code cell, row-major


def draw_grid(rng: random.Random, side: int) -> ProbeGrid:
    """One word of 3-8 characters, in consecutive cells of one row of a side x side grid."""
    length = rng.randint(3, min(8, side))
    word = "".join(rng.choice(ALPHABET) for _ in range(length))
    cells = torch.full((side, side), NONE, dtype=torch.long)
    row, col = rng.randrange(side), rng.randrange(side - length + 1)
    cells[row, col : col + length] = torch.tensor([ALPHABET.index(c) for c in word])
    return ProbeGrid(word, cells)


def shuffled_tokens(grid: ProbeGrid, codes: torch.Tensor, layout: str, tokens_side: int, fold: int = 2) -> torch.Tensor:
    """(tokens_side**2, shuffled width): the visual tokens pixel shuffle would hand to mlp1.

    "token": grid cells are visual tokens, codes (alphabet + 1, shuffled width).
    "patch": grid cells are patches (fold x tokens_side per side, fold = 1 / downsample_ratio), codes (alphabet
    + 1, patch width); each token joins its fold x fold patches row by row (2 x 2: top left, top right, bottom
    left, bottom right)."""
    if layout == "token":
        return codes[grid.cells.reshape(-1)]
    width = codes.shape[1]
    patches = codes[grid.cells]  # (fold x tokens_side, fold x tokens_side, width)
    blocks = patches.reshape(tokens_side, fold, tokens_side, fold, width).permute(0, 2, 1, 3, 4)
    return blocks.reshape(tokens_side * tokens_side, fold * fold * width)


def run_probe(config: ProbeConfig, log_path: str | None = None) -> list[dict[str, float]]:
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(f"ivl-copy-probe:{config.seed}")
    tokenizer = build_tokenizer()
    template = get_template(TEMPLATE)
    spec = replace(demo_spec(config.preset, config.seed), downsample_ratio=config.downsample_ratio)
    model = build_model(spec, tokenizer)
    model.train()
    tokens_side = round(spec.tokens_per_tile**0.5)
    fold = round(1 / config.downsample_ratio)
    shuffled_width = fold * fold * spec.vision_hidden
    side, code_width = ((tokens_side, shuffled_width) if config.layout == "token"
                        else (fold * tokens_side, spec.vision_hidden))
    codes = torch.randn(len(ALPHABET) + 1, code_width, generator=torch.Generator().manual_seed(config.seed))
    image_id = model.config.image_token_id
    trained = [*model.model.multi_modal_projector.parameters(), *model.model.language_model.parameters(),
               *model.lm_head.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, betas=(0.9, 0.98), weight_decay=0.05)
    history: list[dict[str, float]] = []
    window: list[bool] = []
    started = time.perf_counter()
    for step in range(1, config.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, step / config.warmup)
        grids = [draw_grid(rng, side) for _ in range(config.batch)]
        sequences = [build_sequence(tokenizer, template, [Turn(QUESTION_TEXT, g.word, 1)], [spec.tokens_per_tile],
                                    None) for g in grids]
        ids, mask, labels = pad_sequences([(s.input_ids, s.labels) for s in sequences], tokenizer.pad_token_id)
        visual = torch.stack([shuffled_tokens(g, codes, config.layout, tokens_side, fold) for g in grids])
        visual = visual + config.noise * torch.randn_like(visual)
        embeds = model.get_input_embeddings()(ids)
        projected = model.model.multi_modal_projector(visual).reshape(-1, embeds.shape[-1])
        embeds = embeds.masked_scatter((ids == image_id)[..., None], projected.to(embeds.dtype))
        logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        loss_sum, label_tokens, matches = label_loss_and_matches(logits, labels)
        loss = loss_sum / label_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window += matches
        if step % config.log_every == 0 or step == config.steps:
            record = {"step": step, "loss": round(float(loss.detach()), 4), "exact_match": round(sum(window) / len(window), 3),
                      "elapsed_s": round(time.perf_counter() - started, 1)}
            history.append(record)
            window = []
            print(json.dumps(record), flush=True)
            if log_path:
                with open(log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps({**asdict(config), **record}) + "\n")
    return history
