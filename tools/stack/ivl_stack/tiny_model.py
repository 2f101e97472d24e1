"""The offline demo models: the trained tiny demo model committed in the repository (models/, the default),
or a tiny random checkpoint written once with ivl_tiny into the cache folder, then reused."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

DEMO_DIR_NAME = "tiny-demo-checkpoint"
COMPLETE_MARKER = ".ivl-complete"
# The trained demo model (python -m ivl_train; docs/demo_model.md), committed at the repository's root.
TRAINED_DEMO_MODEL = Path(__file__).resolve().parents[3] / "models" / "tiny-internvl-demo"


def trained_demo_model(folder: Path = TRAINED_DEMO_MODEL) -> Path | None:
    """The committed trained demo model, or None where it is not there (e.g. ivl-stack installed alone)."""
    return folder if (folder / "config.json").is_file() else None


def ensure_demo_checkpoint(cache_dir: Path, python: str = sys.executable) -> tuple[Path, bool]:
    """The tiny random checkpoint folder under cache_dir, written with `python -m ivl_tiny --out DIR`
    if it is missing or incomplete. Returns (folder, written_now)."""
    target = cache_dir / DEMO_DIR_NAME
    if (target / COMPLETE_MARKER).exists():
        return target, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = cache_dir / f"{DEMO_DIR_NAME}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    result = subprocess.run(
        [python, "-m", "ivl_tiny", "--out", str(staging)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            "could not write the tiny demo checkpoint with `python -m ivl_tiny` "
            f"(exit {result.returncode}):\n{result.stderr.strip()[-2000:]}"
        )
    (staging / COMPLETE_MARKER).write_text("written by ivl_stack\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target, True


def check_model_path(path: str) -> Path:
    """A user-given checkpoint folder, with a clear message when it cannot be one."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"MODEL_PATH {path!r} is not a folder; download a checkpoint there first (see docs/stack.md)")
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"MODEL_PATH {folder} has no config.json; point it at the folder of an InternVL checkpoint "
            "(e.g. the --local-dir of `huggingface-cli download OpenGVLab/InternVL2_5-1B`)"
        )
    return folder
