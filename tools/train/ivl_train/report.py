"""Where the evaluation's tables go: a section appended to bench/RESULTS.md and the table in the README
(between the two markers below)."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch
import transformers

from ivl_train.evaluate import EvalConfig, EvalReport

README_BEGIN = "<!-- demo-model-accuracy:begin -->"
README_END = "<!-- demo-model-accuracy:end -->"


def _machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.1f} at the end; "
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


def append_results(path: Path, config: EvalConfig, report: EvalReport) -> None:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    mismatches = len(report.mismatches())
    section = "\n".join([
        "", f"## Demo model accuracy: the running stack vs transformers all-in-one ({when})", "",
        f"`python -m ivl_train evaluate --model-path {config.model_path} --seed {config.seed} --per-kind "
        f"{config.per_kind} --start-stack` (or `--base-url` of a running stack): a fresh held-out set drawn from "
        f"seed {config.seed}; each image is asked once through the stack's OpenAI API (the `openai` client) and "
        "once through transformers' InternVLForConditionalGeneration (pixel_values); greedy, exact match after "
        f"lower-casing and removing spaces/punctuation. {_machine()}; {report.seconds / 60:.1f} min. "
        f"Answers that differ between the two paths: {mismatches}.", "",
        report.markdown(), "",
    ])
    with path.open("a") as handle:
        handle.write(section)


def update_readme(path: Path, report: EvalReport) -> None:
    """Replace the block between README_BEGIN and README_END with the current tables."""
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_BEGIN} ... {README_END} block to fill")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    path.write_text(f"{head}{README_BEGIN}\n{report.markdown()}\n{README_END}{tail}")
