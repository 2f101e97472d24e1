"""The vision fingerprint: stable, layout-independent, sensitive to vision weights and settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from ivl_vision.checkpoint import load_vision_encoder
from ivl_vision.checkpoint_config import read_config
from ivl_vision.fingerprint import fingerprint, tensor_sample
from safetensors import safe_open
from safetensors.torch import save_file


def edit_tensor(folder: Path, key: str, change) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][key]
    with safe_open(str(shard), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_stable_across_loads_and_layouts(tiny_original: Path, tiny_native: Path) -> None:
    first = load_vision_encoder(tiny_original).info.fingerprint
    assert first == load_vision_encoder(tiny_original).info.fingerprint
    assert first == load_vision_encoder(tiny_native).info.fingerprint
    assert len(first) == 64 and int(first, 16) >= 0


def test_changes_with_one_vision_weight_not_with_llm_weights(tiny_original: Path, tmp_path: Path) -> None:
    base = load_vision_encoder(tiny_original).info.fingerprint
    vision_edit = shutil.copytree(tiny_original, tmp_path / "vision-edit")

    def bump_first(tensor: torch.Tensor) -> torch.Tensor:
        tensor.view(-1)[0] += 0.25
        return tensor

    edit_tensor(vision_edit, "mlp1.1.weight", bump_first)
    assert load_vision_encoder(vision_edit).info.fingerprint != base
    llm_edit = shutil.copytree(tiny_original, tmp_path / "llm-edit")
    edit_tensor(llm_edit, "language_model.output.weight", lambda t: t * 2)
    assert load_vision_encoder(llm_edit).info.fingerprint == base


def test_changes_with_settings_that_change_embeddings(tiny_original: Path, tmp_path: Path) -> None:
    base = load_vision_encoder(tiny_original).info.fingerprint
    folder = shutil.copytree(tiny_original, tmp_path / "v1")
    config = json.loads((folder / "config.json").read_text())
    config["ps_version"] = "v1"
    (folder / "config.json").write_text(json.dumps(config))
    assert load_vision_encoder(folder).info.fingerprint != base
    config["ps_version"], config["template"] = "v2", "another-template"  # the template does not matter
    (folder / "config.json").write_text(json.dumps(config))
    assert load_vision_encoder(folder).info.fingerprint == base


def test_sample_is_strided_and_covers_the_ends() -> None:
    tensor = torch.arange(10_000, dtype=torch.float32)
    sample = torch.frombuffer(bytearray(tensor_sample(tensor, samples=100)), dtype=torch.float32)
    assert sample[0] == 0 and sample[-1] == 9_999 and 100 <= sample.numel() <= 102
    assert torch.equal(sample[1:3], torch.tensor([100.0, 200.0]))


def test_fingerprint_function_reads_names_shapes_and_dtypes(tiny_original: Path) -> None:
    config = read_config(tiny_original)
    tensors = {"a": torch.zeros(4, 4), "b": torch.ones(3)}
    base = fingerprint(config, tensors, "float32")
    assert fingerprint(config, dict(reversed(tensors.items())), "float32") == base
    assert fingerprint(config, {"a": torch.zeros(16), "b": torch.ones(3)}, "float32") != base
    assert fingerprint(config, {"a": torch.zeros(4, 4, dtype=torch.float64), "b": torch.ones(3)}, "float32") != base
    assert fingerprint(config, {"c": torch.zeros(4, 4), "b": torch.ones(3)}, "float32") != base
    assert fingerprint(config, tensors, "bfloat16") != base
