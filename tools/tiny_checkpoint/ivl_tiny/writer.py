"""write_tiny_checkpoint: one TinySpec -> a checkpoint folder in the original or native layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ivl_tiny.native_model import build_native_config, padded_vocab_size, random_native_state_dict
from ivl_tiny.original_layout import original_config, to_original_state_dict
from ivl_tiny.processor_files import write_processor_files
from ivl_tiny.shards import write_sharded
from ivl_tiny.spec import TinySpec
from ivl_tiny.tokenizer import (
    SpecialTokenIds,
    build_sentencepiece_tokenizer,
    build_tokenizer,
    save_sentencepiece_tokenizer,
    save_tokenizer,
    special_token_ids,
)

LAYOUTS = ("original", "native")
# config.json key marking a checkpoint as random (its replies are noise); services report it in Info.
RANDOM_WEIGHTS_MARKER = "ivl_random_weights"


def write_tiny_checkpoint(out_dir: str | Path, spec: TinySpec | None = None, layout: str = "original") -> Path:
    """Write config.json, generation_config.json, sharded safetensors + index and the tokenizer.

    The folder is created if needed (it must be empty or absent); returns it.
    """
    spec = spec if spec is not None else TinySpec()
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    folder = Path(out_dir)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; the writer only fills an empty or new folder")
    folder.mkdir(parents=True, exist_ok=True)

    if spec.tokenizer == "sentencepiece":
        tokenizer = build_sentencepiece_tokenizer(folder, spec.sentencepiece_vocab)
    else:
        tokenizer = build_tokenizer(spec.tokenizer_merges_target, pad_token="</s>" if spec.llm == "internlm2" else "<|endoftext|>")
    ids = special_token_ids(tokenizer)
    vocab_size = padded_vocab_size(len(tokenizer), spec.vocab_multiple)
    native_config = build_native_config(spec, ids, vocab_size)
    native = random_native_state_dict(native_config, spec)

    if layout == "native":
        native_config.save_pretrained(str(folder))
        _add_config_fields(
            folder / "config.json",
            {"template": spec.chat_template_name, "ps_version": spec.ps_version, RANDOM_WEIGHTS_MARKER: True},
        )
        tensors = native
        is_llm = {name: name.startswith(("model.language_model.", "lm_head.")) for name in tensors}
    else:
        config = {**original_config(spec, ids, vocab_size), RANDOM_WEIGHTS_MARKER: True}
        (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        tensors = to_original_state_dict(native, spec)
        is_llm = {name: name.startswith("language_model.") for name in tensors}
    write_sharded(folder, tensors, is_llm)
    (folder / "generation_config.json").write_text(json.dumps(_generation_config(spec, ids), indent=2) + "\n")
    if spec.tokenizer == "sentencepiece":
        save_sentencepiece_tokenizer(tokenizer, folder)
    else:
        save_tokenizer(tokenizer, folder)
        if layout == "native":  # AutoProcessor files, as the -hf releases ship them
            write_processor_files(folder, spec)
    return folder


def _add_config_fields(path: Path, fields: dict[str, Any]) -> None:
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _generation_config(spec: TinySpec, ids: SpecialTokenIds) -> dict[str, Any]:
    """Stop tokens as the releases list them: the chat template's end-of-turn token included."""
    if spec.llm == "internlm2":
        return {"bos_token_id": ids.bos, "eos_token_id": [ids.eos, ids.im_end], "pad_token_id": ids.eos}
    return {"bos_token_id": ids.endoftext, "eos_token_id": [ids.im_end, ids.endoftext], "pad_token_id": ids.endoftext}
