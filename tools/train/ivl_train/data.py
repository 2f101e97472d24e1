"""Examples for training and evaluation: synthetic image(s) -> the vision service's own preprocessing
(PNG bytes -> ivl_vision.preprocess.preprocess_trusted: the service's decode, exact tiling, normalisation) and the
conversation -> the LLM service's own templates (prompts.py). Example `i` of seed `s` depends on
(s, i) only, so a resumed run sees exactly the examples an uninterrupted one would.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from ivl_llm.templates import Template
from ivl_vision.image_io import ImageLimits
from ivl_vision.preprocess import PreprocessedImage, preprocess_trusted
from ivl_vision.tiling import TilingConfig
from PIL import Image
from transformers import PreTrainedTokenizerFast

from ivl_train.aux_targets import AuxTargets, aux_targets, offset_targets
from ivl_train.prompts import Turn, build_sequence, draw_system
from ivl_train.synth import KINDS, LARGE_MAX_TILES_WEIGHTS, Sample, make_sample, text_page

ONE_VIEW = (1.0, 0.0, 0.0, 0.0, 0.0)  # LARGE_MAX_TILES weights: always max_tiles 1
# Share of each kind among training examples (their cost differs: small-text images have 5-13 tiles).
DEFAULT_KIND_WEIGHTS = {"text": 0.3, "number": 0.14, "color": 0.08, "chinese": 0.16, "small": 0.32}


@dataclass(frozen=True)
class DataConfig:
    seed: int = 0
    kind_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS))
    two_turn_fraction: float = 0.06  # conversations of two turns (a second image in the second turn)
    large_tile_weights: tuple[float, ...] = LARGE_MAX_TILES_WEIGHTS  # tile budgets of the large kinds
    # Curriculum: the first `first_phase_examples` are the cheap ones (large kinds, one 448 px view,
    # single turn): reading is learned there; tiles, small text and second turns come after.
    first_phase_examples: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.kind_weights) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")


@dataclass
class Example:
    kind: str  # kind of the last turn (the one evaluated)
    answer: str
    pixel_values: torch.Tensor  # (tiles of all images, 3, 448, 448) float32
    input_ids: list[int]
    labels: list[int]
    prompt: str = ""
    aux: AuxTargets = field(default_factory=lambda: AuxTargets((), ()))  # training-only per-token character targets (aux_targets.py)

    @property
    def tiles(self) -> int:
        return int(self.pixel_values.shape[0])


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class ExampleMaker:
    """Turns samples into model inputs with the serving stack's preprocessing and prompt code."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerFast, template: Template, tokens_per_tile: int, config: DataConfig
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.tokens_per_tile = tokens_per_tile
        self.config = config
        self.limits = ImageLimits()
        self._kinds = list(config.kind_weights)
        self._weights = [config.kind_weights[k] for k in self._kinds]

    def tiles(self, image: Image.Image, max_tiles: int) -> PreprocessedImage:
        return preprocess_trusted(png_bytes(image), TilingConfig(max_tiles=max_tiles), self.limits)

    def from_samples(self, samples: list[Sample], max_tiles: list[int], system: str | None) -> Example:
        images = [self.tiles(s.image, m) for s, m in zip(samples, max_tiles, strict=True)]
        turns = [Turn(s.question, s.answer, images=1) for s in samples]
        rows = [i.pixels.shape[0] * self.tokens_per_tile for i in images]
        sequence = build_sequence(self.tokenizer, self.template, turns, rows, system)
        aux = offset_targets([(aux_targets(s.chars, i.plan), i.pixels.shape[0]) for s, i in zip(samples, images, strict=True)])
        return Example(
            kind=samples[-1].kind,
            answer=samples[-1].answer,
            pixel_values=torch.from_numpy(np.concatenate([i.pixels for i in images])),
            input_ids=sequence.input_ids,
            labels=sequence.labels,
            prompt=sequence.text,
            aux=aux,
        )

    def training_example(self, index: int) -> Example:
        rng = random.Random(f"ivl-train:{self.config.seed}:{index}")
        if index < self.config.first_phase_examples:
            kinds = [k for k in self._kinds if k != "small"]
            kind = rng.choices(kinds, weights=[self.config.kind_weights[k] for k in kinds])[0]
            sample = make_sample(kind, rng, large_tile_weights=ONE_VIEW)
            return self.from_samples([sample], [sample.max_tiles], draw_system(rng))
        kind = rng.choices(self._kinds, weights=self._weights)[0]
        sample = make_sample(kind, rng, large_tile_weights=self.config.large_tile_weights)
        system = draw_system(rng)
        if rng.random() < self.config.two_turn_fraction:
            first_kind = rng.choices(self._kinds, weights=self._weights)[0]
            first = make_sample("text" if first_kind == "small" else first_kind, rng)
            return self.from_samples([first, sample], [1, sample.max_tiles], system)
        return self.from_samples([sample], [sample.max_tiles], system)


# Vision pre-training pages: the tile budgets they are cut with, and how many pages make one step.
PAGE_MAX_TILES = (1, 4, 6, 12)
PAGE_MAX_TILES_WEIGHTS = (0.6, 0.15, 0.1, 0.15)
PAGES_PER_STEP = 6


@dataclass
class PageBatch:
    pixel_values: torch.Tensor  # (tiles, 3, 448, 448)
    aux: AuxTargets


def page_batch(maker: ExampleMaker, step: int) -> PageBatch:
    """The pages of vision pre-training step `step` (PAGES_PER_STEP pages, seeded by their index)."""
    pixels, parts = [], []
    for index in range(step * PAGES_PER_STEP, (step + 1) * PAGES_PER_STEP):
        rng = random.Random(f"ivl-pages:{maker.config.seed}:{index}")
        max_tiles = rng.choices(PAGE_MAX_TILES, weights=PAGE_MAX_TILES_WEIGHTS)[0]
        image, chars = text_page(rng, max_tiles)
        tiled = maker.tiles(image, max_tiles)
        pixels.append(tiled.pixels)
        parts.append((aux_targets(chars, tiled.plan), tiled.pixels.shape[0]))
    return PageBatch(torch.from_numpy(np.concatenate(pixels)), offset_targets(parts))


class StepStream(torch.utils.data.IterableDataset):
    """The examples of each optimizer step, from `start_step` on: step s holds examples
    s*batch .. s*batch + batch - 1. Run in a DataLoader worker so images are drawn beside training."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerFast, template: Template, tokens_per_tile: int, config: DataConfig,
        batch: int, start_step: int, steps: int, vision_steps: int = 0,
    ) -> None:
        super().__init__()
        self.args = (tokenizer, template, tokens_per_tile, config)
        self.batch, self.start_step, self.steps, self.vision_steps = batch, start_step, steps, vision_steps

    def __iter__(self) -> Iterator[PageBatch | list[Example]]:
        """Steps before vision_steps are page batches (vision pre-training); then chat examples: chat
        step s holds examples (s - vision_steps) * batch ... + batch - 1."""
        if torch.utils.data.get_worker_info() is not None:  # a DataLoader worker: leave the cores to training
            torch.set_num_threads(1)
        maker = ExampleMaker(*self.args)
        for step in range(self.start_step, self.steps):
            if step < self.vision_steps:
                yield page_batch(maker, step)
            else:
                first = (step - self.vision_steps) * self.batch
                yield [maker.training_example(first + i) for i in range(self.batch)]
