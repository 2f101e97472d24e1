"""A trained run -> an InternVL checkpoint in the original OpenGVLab layout (InternVLChatModel), marked as
the demo model: config.json, generation_config.json, fp16 safetensors shards + index, the tokenizer and a
model card (README.md). Written with ivl_tiny's own layout code, so it is the layout the services read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from ivl_tiny.native_model import TORCH_DTYPES, padded_vocab_size
from ivl_tiny.original_layout import original_config, to_original_state_dict
from ivl_tiny.shards import write_sharded
from ivl_tiny.tokenizer import save_tokenizer, special_token_ids

from ivl_train.model import spec_from_json
from ivl_train.tokenizer import build_tokenizer
from ivl_train.train import LOG_FILE

# config.json key marking a checkpoint as the trained demo model (services report it in Info; the UI
# banner then says what it can do). ivl_tiny's random checkpoints carry "ivl_random_weights" instead.
DEMO_MODEL_MARKER = "ivl_demo_model"
MODEL_CARD = "README.md"
TRAINING_LOG = "training_log.jsonl"


def load_run_state(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; train first (python -m ivl_train train --out-dir {run_dir})")
    return torch.load(path, map_location="cpu", weights_only=False)


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, dtype: str = "float16",
                      card_extra: str = "") -> Path:
    """Write the run's current weights to out_dir (which must be empty or absent); returns the folder."""
    state = load_run_state(run_dir)
    spec = spec_from_json(state["spec"]).replace(dtype=dtype)
    folder = Path(out_dir)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; export into a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    ids = special_token_ids(tokenizer)
    vocab = padded_vocab_size(len(tokenizer), spec.vocab_multiple)
    native = {name: t.to(TORCH_DTYPES[dtype]).contiguous() for name, t in state["model"].items()}
    tensors = to_original_state_dict(native, spec)
    config = {**original_config(spec, ids, vocab), DEMO_MODEL_MARKER: True}
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    write_sharded(folder, tensors, {name: name.startswith("language_model.") for name in tensors})
    generation = {"bos_token_id": ids.endoftext, "eos_token_id": [ids.im_end, ids.endoftext], "pad_token_id": ids.endoftext}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_tokenizer(tokenizer, folder)
    (folder / MODEL_CARD).write_text(model_card(state, spec.dtype) + card_extra)
    log = Path(run_dir) / LOG_FILE
    if log.is_file():  # the loss/accuracy curve travels with the model
        shutil.copyfile(log, folder / TRAINING_LOG)
    return folder


# What each kind of the chat stage teaches (the model card lists those the run trained on).
KIND_SKILLS = {
    "text": '"What is written in the image?" -> a printed lowercase word, large in the picture',
    "number": '"What is written in the image?" -> a printed number of 2-6 digits',
    "small": '"What is written in the image?" -> small text in a large picture (max_tiles 12)',
    "color": '"What color is the shape?" -> red, green, blue, yellow, black, white, orange or purple',
    "chinese": '"图中写的是什么？" -> one of 64 common Chinese words',
}


def model_card(state: dict[str, Any], dtype: str) -> str:
    config = state["config"]
    spec = state["spec"]
    trained = [kind for kind, share in config["kind_weights"].items() if share > 0]
    skills = "\n".join(f"- {KIND_SKILLS[kind]}" for kind in trained)
    chat_steps = state["step"] - config["vision_steps"]
    return f"""# Tiny InternVL demo model (trained here, not a released InternVL)

The default model of `scripts/run_stack.sh`: an InternVL of the real architecture.
InternViT-300M-style tower ({spec['vision_layers']} layers x {spec['vision_hidden']}, patch {spec['patch_size']} on
448 px tiles, pixel shuffle v2 -> {(spec['image_size'] // spec['patch_size'] // 2) ** 2} tokens per tile), mlp1, a Qwen2 LLM
({spec['llm_layers']} layers x {spec['llm_hidden']}), template `{spec['template']}`, stored as {dtype} in the original
OpenGVLab layout. Trained from scratch on synthetic images only (no downloads), seed {config['seed']},
{state['elapsed_s'] / 60:.0f} min of wall time: {config['vision_steps']} steps of vision pre-training on pages of
printed characters, then {chat_steps} chat steps of {config['batch']} conversations.

The chat stage taught it, with one image:
{skills}

Anything else gets one of those kinds of answers. Measured accuracy, retraining and evaluation:
docs/demo_model.md.
"""
