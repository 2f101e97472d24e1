"""The training loop: seeded, resumable (state.pt every save_every steps), a progress bar, a JSON-lines log
of loss and exact-match accuracy per kind (training batches and a fixed held-out set).

Two stages, as InternVL trains its vision tower before the whole model:
1. vision pre-training (`vision_steps`): pages of printed words, the vision tower learns which character
   each patch shows (aux_targets.py); the LLM is not run.
2. chat: conversations through the stack's templates; the language-model loss on the replies plus the
   per-patch loss with weight `aux_weight`. The first `first_phase_steps` chat steps are one-view
   large-kind examples (cheap), then the full mix (tiles, small text, second turns).
AdamW, linear warmup then cosine decay per stage, gradient clipping; fp32 on the CPU (bf16 is slower there).
The patch embedding starts from whitened principal components of training patches and the position
embeddings from 2-D sine-cosine tables (model.py); everything is trained.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from ivl_llm.templates import get_template
from tqdm import tqdm

from ivl_train.aux_targets import PatchHead, aux_loss, offset_targets, patch_labels
from ivl_train.batching import forward, forward_with_features, loss_and_matches, pack
from ivl_train.data import (
    DEFAULT_KIND_WEIGHTS,
    DataConfig,
    Example,
    ExampleMaker,
    PageBatch,
    StepStream,
    page_batch,
)
from ivl_train.model import (
    TEMPLATE,
    build_model,
    count_parameters,
    demo_spec,
    pca_patch_init,
    sincos_position_init,
    spec_to_json,
)
from ivl_train.synth import KINDS, LARGE_MAX_TILES_WEIGHTS, SMALL_EVAL_SIZE, make_sample
from ivl_train.tokenizer import build_tokenizer

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"
CONFIG_FILE = "train_config.json"


@dataclass
class TrainConfig:
    out_dir: str
    preset: str = "demo"
    seed: int = 0
    steps: int = 3000
    batch: int = 16  # examples per optimizer step
    lr: float = 1e-3
    min_lr: float = 5e-5
    warmup: int = 150
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    token_budget: int = 3200  # padded tokens per micro-batch
    threads: int = 2
    workers: int = 1  # DataLoader processes drawing the images (0 = in the training process)
    log_every: int = 10
    save_every: int = 100
    eval_every: int = 250
    eval_per_kind: int = 16
    kind_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_KIND_WEIGHTS))
    two_turn_fraction: float = 0.06
    vision_steps: int = 0  # stage 1: vision pre-training steps (pages, per-patch loss only)
    first_phase_steps: int = 0  # curriculum: chat steps of one-view large-kind examples first (data.py)
    aux_weight: float = 0.5  # weight of the training-only per-patch character loss in the chat stage
    pca_init: bool = True
    large_tile_weights: tuple[float, ...] = LARGE_MAX_TILES_WEIGHTS

    def data_config(self) -> DataConfig:
        return DataConfig(
            seed=self.seed, kind_weights=self.kind_weights, two_turn_fraction=self.two_turn_fraction,
            large_tile_weights=tuple(self.large_tile_weights),
            first_phase_examples=self.first_phase_steps * self.batch,
        )

    def lr_at(self, step: int) -> float:
        """Warmup then cosine within each stage; the vision stage decays to 30 % of lr, the chat stage to min_lr."""
        if step < self.vision_steps:
            start, length, floor = 0, self.vision_steps, 0.3 * self.lr
        else:
            start, length, floor = self.vision_steps, self.steps - self.vision_steps, self.min_lr
        local = step - start
        warmup = min(self.warmup, max(1, length // 5))
        if local < warmup:
            return self.lr * (local + 1) / warmup
        progress = (local - warmup) / max(1, length - warmup)
        return floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


# What a resumed run must agree on with the run that wrote the state (the rest may change, e.g. logging).
RESUME_FIELDS = ("preset", "seed", "batch", "kind_weights", "two_turn_fraction", "large_tile_weights",
                 "first_phase_steps", "vision_steps", "pca_init")


def heldout_examples(maker: ExampleMaker, per_kind: int, seed: int, kinds: tuple[str, ...] = KINDS) -> list[Example]:
    """A fixed set drawn from its own seed (never a training index): small text at 1600x1200, 12 tiles."""
    import random

    out = []
    for kind in kinds:
        for i in range(per_kind):
            rng = random.Random(f"ivl-heldout:{seed}:{kind}:{i}")
            sample = make_sample(kind, rng, small_size=SMALL_EVAL_SIZE)
            out.append(maker.from_samples([sample], [12], None))
    return out


def evaluate_teacher_forced(model: torch.nn.Module, examples: list[Example], pad_id: int, budget: int) -> dict[str, float]:
    """Exact match per kind: the whole answer + end-of-turn token is the argmax (= greedy decoding)."""
    correct: dict[str, int] = defaultdict(int)
    seen: dict[str, int] = defaultdict(int)
    model.eval()
    with torch.inference_mode():
        for batch in pack(examples, pad_id, budget):
            _, _, matches = loss_and_matches(forward(model, batch), batch)
            for example, ok in zip(batch.examples, matches, strict=True):
                seen[example.kind] += 1
                correct[example.kind] += int(ok)
    model.train()
    return {kind: correct[kind] / seen[kind] for kind in seen}


@dataclass
class StepStats:
    loss_sum: float = 0.0  # summed language-model loss over the label tokens
    labels: int = 0
    aux_sum: float = 0.0  # mean per-patch loss of the step
    chars: int = 0  # characters the per-patch head was asked for
    char_hits: int = 0
    matches: dict[str, list[bool]] = field(default_factory=lambda: defaultdict(list))


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.out = Path(config.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(config.threads)
        self.tokenizer = build_tokenizer()
        self.template = get_template(TEMPLATE)
        self.spec = demo_spec(config.preset, config.seed)
        self.model = build_model(self.spec, self.tokenizer)
        self.model.train()
        # training-only: the per-patch character head (aux_targets.py); never exported
        self.aux_head = PatchHead(self.spec.vision_hidden)
        named = [*self.model.named_parameters(), *(("aux_head." + n, p) for n, p in self.aux_head.named_parameters())]
        decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.98), eps=1e-8,
        )
        self.step = 0
        self.elapsed_s = 0.0  # training wall time over all (resumed) sessions
        self.cpu_s = 0.0
        self._resume()

    # state -------------------------------------------------------------------------------------
    def _resume(self) -> None:
        path = self.out / STATE_FILE
        if not path.exists():
            self._initialise()
            (self.out / CONFIG_FILE).write_text(json.dumps(self._config_record(), indent=2) + "\n")
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = state["config"]
        for name in RESUME_FIELDS:
            if saved.get(name) != getattr(self.config, name):
                raise ValueError(
                    f"{path} was written with {name}={saved.get(name)!r}, this run has {getattr(self.config, name)!r}; "
                    "use the same settings to resume or another --out folder to start afresh"
                )
        self.model.load_state_dict(state["model"])
        self.aux_head.load_state_dict(state["aux_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.elapsed_s = float(state.get("elapsed_s", 0.0))
        self.cpu_s = float(state.get("cpu_s", 0.0))
        torch.set_rng_state(state["torch_rng"])

    def _initialise(self) -> None:
        """Sine-cosine position embeddings; the patch embedding from PCA of pages (seeded, off the training
        indices)."""
        sincos_position_init(self.model)
        if self.config.pca_init:
            maker = ExampleMaker(self.tokenizer, self.template, self.spec.tokens_per_tile, self.config.data_config())
            tiles = torch.cat([page_batch(maker, -1 - i).pixel_values for i in range(8)])
            pca_patch_init(self.model, tiles)

    def _config_record(self) -> dict[str, Any]:
        return {**asdict(self.config), "spec": spec_to_json(self.spec), "parameters": count_parameters(self.model)}

    def save(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "aux_head": self.aux_head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "cpu_s": self.cpu_s,
            "config": asdict(self.config),
            "spec": spec_to_json(self.spec),
            "torch_rng": torch.get_rng_state(),
        }
        tmp = self.out / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.out / STATE_FILE)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.out / LOG_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    # loop --------------------------------------------------------------------------------------
    def loader(self) -> torch.utils.data.DataLoader:
        stream = StepStream(
            self.tokenizer, self.template, self.spec.tokens_per_tile, self.config.data_config(),
            self.config.batch, self.step, self.config.steps, self.config.vision_steps,
        )
        return torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=self.config.workers,
            prefetch_factor=2 if self.config.workers else None, persistent_workers=False,
        )

    def _optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *self.aux_head.parameters()], self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def vision_step(self, pages: PageBatch) -> StepStats:
        """Stage 1: the tower and the patch head only."""
        self._set_lr()
        patches = self.model.model.vision_tower(pixel_values=pages.pixel_values).last_hidden_state[:, 1:]
        labels = patch_labels(pages.aux, patches.shape[0], patches.shape[1])
        loss, chars, hits = aux_loss(self.aux_head(patches), labels)
        loss.backward()
        self._optimizer_step()
        return StepStats(aux_sum=float(loss.detach()), chars=chars, char_hits=hits)

    def chat_step(self, examples: list[Example]) -> StepStats:
        """Stage 2: the language-model loss on the replies + aux_weight x the per-patch loss."""
        self._set_lr()
        batches = pack(examples, self.tokenizer.pad_token_id, self.config.token_budget)
        total_labels = sum(sum(1 for x in e.labels[1:] if x != -100) for e in examples)
        total_tiles = sum(e.tiles for e in examples)
        stats = StepStats(labels=total_labels)
        for batch in batches:
            logits, patches = forward_with_features(self.model, batch)
            loss, _, ok = loss_and_matches(logits, batch)
            total = loss / total_labels
            if self.config.aux_weight:
                offsets = [(e.aux, e.tiles) for e in batch.examples]
                labels = patch_labels(offset_targets(offsets), patches.shape[0], patches.shape[1])
                aux, chars, hits = aux_loss(self.aux_head(patches), labels)
                share = sum(e.tiles for e in batch.examples) / total_tiles
                total = total + self.config.aux_weight * share * aux
                stats.aux_sum += float(aux.detach()) * share
                stats.chars += chars
                stats.char_hits += hits
            total.backward()
            stats.loss_sum += float(loss.detach())
            for example, good in zip(batch.examples, ok, strict=True):
                stats.matches[example.kind].append(good)
        self._optimizer_step()
        return stats

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr_at(self.step)

    def run(self) -> None:
        config = self.config
        if self.step >= config.steps:
            return
        held_maker = ExampleMaker(self.tokenizer, self.template, self.spec.tokens_per_tile, config.data_config())
        kinds = tuple(k for k in KINDS if config.kind_weights.get(k, 0) > 0)
        heldout = heldout_examples(held_maker, config.eval_per_kind, config.seed + 1, kinds) if config.eval_every else []
        window: list[StepStats] = []
        bar = tqdm(total=config.steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True)
        started_wall, started_cpu = time.perf_counter(), time.process_time()
        base_elapsed, base_cpu = self.elapsed_s, self.cpu_s
        try:
            for batch in self.loader():
                vision = self.step < config.vision_steps
                window.append(self.vision_step(batch) if vision else self.chat_step(batch))
                self.step += 1
                self.elapsed_s = base_elapsed + time.perf_counter() - started_wall
                self.cpu_s = base_cpu + time.process_time() - started_cpu
                bar.update(1)
                stage_ends = self.step == config.vision_steps
                if self.step % config.log_every == 0 or self.step == config.steps or stage_ends:
                    record = self._record(window, "vision" if vision else "chat")
                    bar.set_postfix({k: v for k, v in record.items() if k in ("stage", "loss", "aux_loss", "char_acc")})
                    self.log(record)
                    window = []
                chat_steps = self.step - config.vision_steps
                if heldout and chat_steps > 0 and (chat_steps % config.eval_every == 0 or self.step == config.steps):
                    accuracy = evaluate_teacher_forced(self.model, heldout, self.tokenizer.pad_token_id, config.token_budget)
                    self.log({"step": self.step, "heldout_acc": accuracy, "elapsed_s": round(self.elapsed_s, 1)})
                    tqdm.write(f"step {self.step}: held-out exact match " +
                               ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items()))
                if self.step % config.save_every == 0 or self.step == config.steps or stage_ends:
                    self.save()
        finally:
            bar.close()

    def _record(self, window: list[StepStats], stage: str) -> dict[str, Any]:
        matches: dict[str, list[bool]] = defaultdict(list)
        for stats in window:
            for kind, values in stats.matches.items():
                matches[kind] += values
        labels = sum(s.labels for s in window)
        chars = sum(s.chars for s in window)
        record: dict[str, Any] = {
            "step": self.step, "stage": stage,
            "aux_loss": round(sum(s.aux_sum for s in window) / max(1, len(window)), 4),
            "char_acc": round(sum(s.char_hits for s in window) / max(1, chars), 4),
        }
        if labels:
            record["loss"] = round(sum(s.loss_sum for s in window) / labels, 4)
            record["train_acc"] = {k: round(sum(v) / len(v), 3) for k, v in sorted(matches.items())}
        record.update(lr=self.config.lr_at(self.step - 1), elapsed_s=round(self.elapsed_s, 1),
                      cpu_s=round(self.cpu_s, 1), load=round(os.getloadavg()[0], 2))
        return record
