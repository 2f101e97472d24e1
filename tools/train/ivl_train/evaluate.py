"""Held-out accuracy of a checkpoint per kind, through the running stack (its OpenAI API, the real `openai`
client) and through transformers' all-in-one InternVLForConditionalGeneration; both must give the same
answer, character for character, for every image.

The held-out set is drawn from its own seed (never a training index). Large kinds go with the stack's
default tiling (the checkpoint's max_dynamic_patch); the small-text images (1600x1200) with each of
`small_max_tiles`. Scoring: exact match after lower-casing and removing spaces and punctuation, greedy.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ivl_llm.checkpoint import read_checkpoint
from ivl_llm.prompt import ImageEmbedding, PromptBuilder
from ivl_llm.templates import ChatMessage, get_template, image_placeholders
from ivl_vision.checkpoint_config import read_config as read_vision_config
from ivl_vision.image_io import ImageLimits
from ivl_vision.preprocess import preprocess_trusted
from ivl_vision.tiling import TilingConfig

from ivl_train.allinone import load_allinone
from ivl_train.data import png_bytes
from ivl_train.synth import SMALL_EVAL_SIZE, make_sample

LARGE_KINDS = ("text", "number", "color", "chinese")
MAX_NEW_TOKENS = 24
READY_TIMEOUT_S = 600.0


def normalise(text: str) -> str:
    """Lower-cased, without spaces and punctuation (Unicode categories P*, S*, Z*, C*)."""
    return "".join(c for c in text.lower() if unicodedata.category(c)[0] not in "PSZC")


@dataclass(frozen=True)
class EvalItem:
    kind: str
    index: int
    png: bytes
    question: str
    answer: str
    max_tiles: int | None  # None = the stack's default tiling


def heldout_set(seed: int, per_kind: int, small_max_tiles: Sequence[int]) -> list[EvalItem]:
    items = []
    for kind in LARGE_KINDS:
        for i in range(per_kind):
            sample = make_sample(kind, random.Random(f"ivl-eval:{seed}:{kind}:{i}"))
            items.append(EvalItem(kind, i, png_bytes(sample.image), sample.question, sample.answer, None))
    for i in range(per_kind):
        sample = make_sample("small", random.Random(f"ivl-eval:{seed}:small:{i}"), small_size=SMALL_EVAL_SIZE)
        data = png_bytes(sample.image)
        for tiles in small_max_tiles:
            items.append(EvalItem("small", i, data, sample.question, sample.answer, tiles))
    return items


@dataclass
class Outcome:
    item: EvalItem
    stack: str = ""
    allinone: str = ""
    tiles: int = 0

    @property
    def stack_ok(self) -> bool:
        return normalise(self.stack) == normalise(self.item.answer)

    @property
    def allinone_ok(self) -> bool:
        return normalise(self.allinone) == normalise(self.item.answer)


class AllInOne:
    """The reference: the checkpoint as one transformers model, fed pixel_values; the prompt is built the
    way the LLM service builds it (its template, its default system message, its placeholder expansion)."""

    def __init__(self, model_path: str | Path) -> None:
        self.model, self.tokenizer = load_allinone(model_path)
        vision = read_vision_config(Path(model_path))  # the vision service's defaults
        max_tiles = vision.max_dynamic_patch if vision.dynamic_image_size else 1
        self.default_tiling = TilingConfig(
            image_size=vision.image_size, max_tiles=max_tiles, min_tiles=min(vision.min_dynamic_patch, max_tiles),
            use_thumbnail=vision.use_thumbnail,
        )
        checkpoint = read_checkpoint(model_path)
        template = get_template(checkpoint.template)
        self.hidden = checkpoint.hidden_size
        self.builder = PromptBuilder(self.tokenizer, template, self.hidden, checkpoint.context_length,
                                     checkpoint.system_message)
        self.tokens_per_tile = self.model.config.image_seq_length
        self.stop_ids = sorted({self.tokenizer.convert_tokens_to_ids(template.stop_token), self.tokenizer.eos_token_id})
        self.limits = ImageLimits()

    def answer(self, item: EvalItem) -> tuple[str, int]:
        tiling = self.default_tiling.with_overrides(item.max_tiles, None, None)
        tiling = tiling.with_overrides(None, min(tiling.min_tiles, tiling.max_tiles), None)
        pixels = preprocess_trusted(item.png, tiling, self.limits).pixels  # the service's decode and tiling
        rows = pixels.shape[0] * self.tokens_per_tile
        placeholder = ImageEmbedding(np.zeros((rows, self.hidden), dtype=np.float32), "float32")
        messages = [ChatMessage("user", image_placeholders(1) + item.question)]
        prompt = self.builder.prepare(messages, [placeholder], MAX_NEW_TOKENS)
        ids = torch.tensor([prompt.input_ids])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.from_numpy(pixels),
                max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=self.stop_ids,
                pad_token_id=self.stop_ids[0],
            )
        new = out[0, ids.shape[1] :].tolist()
        if new and new[-1] in self.stop_ids:
            new = new[:-1]
        return self.tokenizer.decode(new, skip_special_tokens=True), pixels.shape[0]


def served_model(client: Any) -> str:
    """The model id the stack serves (its /v1/models); the gateway refuses any other name."""
    return str(client.models.list().data[0].id)


def stack_answer(client: Any, item: EvalItem, model: str) -> str:
    url = "data:image/png;base64," + base64.b64encode(item.png).decode()
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": item.question}]}],
        temperature=0, max_tokens=MAX_NEW_TOKENS,
        extra_body={"max_tiles": item.max_tiles} if item.max_tiles is not None else None,
    )
    return response.choices[0].message.content or ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def launched_stack(model_path: str | Path, threads: int) -> Iterator[str]:
    """`python -m ivl_stack --no-ui` on free ports serving model_path; yields the OpenAI base URL."""
    ports = {name: _free_port() for name in ("http-port", "grpc-port", "vision-port", "llm-port", "redis-port", "ui-port")}
    with tempfile.TemporaryDirectory(prefix="ivl-eval-") as tmp:
        ready = Path(tmp) / "ready.json"
        argv = [sys.executable, "-m", "ivl_stack", "--no-ui", "--model-path", str(model_path), "--ready-file", str(ready)]
        for name, port in ports.items():
            argv += [f"--{name}", str(port)]
        env = {**os.environ, "IVL_VISION_TORCH_THREADS": str(threads), "IVL_LLM_TORCH_THREADS": str(threads)}
        log = open(Path(tmp) / "stack.log", "w")  # noqa: SIM115 (closed below)
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not ready.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the stack did not start:\n{(Path(tmp) / 'stack.log').read_text()[-3000:]}")
                time.sleep(0.5)
            yield f"http://127.0.0.1:{ports['http-port']}/v1"
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()


@dataclass
class EvalConfig:
    model_path: str
    seed: int = 1234
    per_kind: int = 50
    small_max_tiles: tuple[int, ...] = (1, 2, 6, 12)
    base_url: str = ""
    api_key: str = "none"
    results: str | None = None
    readme: str | None = None
    start_stack: bool = False
    threads: int = 2
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalReport:
    outcomes: list[Outcome]
    seconds: float

    def mismatches(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.stack != o.allinone]

    def kind_rows(self) -> list[list[str]]:
        rows = []
        for kind in LARGE_KINDS:
            group = [o for o in self.outcomes if o.item.kind == kind]
            rows.append(_row(kind, "default (12)", group))
        twelve = [o for o in self.outcomes if o.item.kind == "small" and o.item.max_tiles == 12]
        if twelve:
            rows.append(_row("small text (1600x1200)", "12", twelve))
        return rows

    def tile_rows(self) -> list[list[str]]:
        rows = []
        for tiles in sorted({o.item.max_tiles for o in self.outcomes if o.item.kind == "small"}):
            group = [o for o in self.outcomes if o.item.kind == "small" and o.item.max_tiles == tiles]
            seen = sorted({o.tiles for o in group})
            rows.append(_row(str(tiles), "/".join(map(str, seen)), group))
        return rows

    def markdown(self) -> str:
        header = ["kind", "max_tiles", "n", "accuracy (stack)", "accuracy (all-in-one)", "identical answers"]
        tiles_header = ["max_tiles", "tiles per image", "n", "accuracy (stack)", "accuracy (all-in-one)",
                        "identical answers"]
        return "\n".join([
            *_table(header, self.kind_rows()), "",
            "Small text (26-32 px high in 1600x1200 images) vs the tile budget:", "",
            *_table(tiles_header, self.tile_rows()),
        ])


def _row(name: str, tiles: str, group: list[Outcome]) -> list[str]:
    n = len(group)
    same = sum(o.stack == o.allinone for o in group)
    return [name, tiles, str(n), f"{sum(o.stack_ok for o in group) / n:.0%}",
            f"{sum(o.allinone_ok for o in group) / n:.0%}", f"{same}/{n}"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def evaluate(config: EvalConfig, base_url: str) -> EvalReport:
    from openai import OpenAI
    from tqdm import tqdm

    torch.set_num_threads(config.threads)
    items = heldout_set(config.seed, config.per_kind, config.small_max_tiles)
    client = OpenAI(base_url=base_url, api_key=config.api_key, timeout=300, max_retries=0)
    reference = AllInOne(config.model_path)
    model = served_model(client)
    started = time.perf_counter()
    outcomes = []
    for item in tqdm(items, desc="evaluating", unit="image", disable=not config.progress):
        outcome = Outcome(item)
        outcome.stack = stack_answer(client, item, model)
        outcome.allinone, outcome.tiles = reference.answer(item)
        outcomes.append(outcome)
    return EvalReport(outcomes, time.perf_counter() - started)


def run_evaluation(config: EvalConfig) -> int:
    if not config.base_url and not config.start_stack:
        raise ValueError("give --base-url of a running stack (e.g. http://127.0.0.1:8000/v1) or --start-stack")
    with contextlib.ExitStack() as stack:
        base_url = config.base_url or stack.enter_context(launched_stack(config.model_path, config.threads))
        report = evaluate(config, base_url)
    text = report.markdown()
    print(text)
    for outcome in report.mismatches()[:10]:
        print(f"MISMATCH {outcome.item.kind} #{outcome.item.index} max_tiles {outcome.item.max_tiles}: "
              f"stack {outcome.stack!r} vs all-in-one {outcome.allinone!r}")
    if config.results:
        from ivl_train.report import append_results

        append_results(Path(config.results), config, report)
    if config.readme:
        from ivl_train.report import update_readme

        update_readme(Path(config.readme), report)
    return 1 if report.mismatches() else 0
