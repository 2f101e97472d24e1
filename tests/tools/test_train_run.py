"""ivl_train end to end on the smoke-sized model: both stages run, a stopped run resumes where it stopped,
and the export is a checkpoint the vision service, the LLM service and transformers' all-in-one model load
with the very weights that were trained (split == all-in-one, bit for bit)."""

from __future__ import annotations

import json

import pytest
import torch
from ivl_llm.checkpoint import build_causal_lm, read_checkpoint
from ivl_train.allinone import load_allinone
from ivl_train.export import DEMO_MODEL_MARKER, export_checkpoint, load_run_state
from ivl_train.model import build_model, spec_from_json
from ivl_train.tokenizer import build_tokenizer
from ivl_train.train import LOG_FILE, TrainConfig, Trainer
from ivl_vision.checkpoint import load_vision_encoder

pytestmark = pytest.mark.slow


def smoke_config(out_dir, steps: int) -> TrainConfig:
    return TrainConfig(out_dir=str(out_dir), preset="smoke", steps=steps, vision_steps=2, first_phase_steps=1,
                       batch=2, log_every=1, save_every=1, eval_every=0, workers=0, threads=1, pca_init=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    Trainer(smoke_config(out, steps=3)).run()
    resumed = Trainer(smoke_config(out, steps=4))
    assert resumed.step == 3
    resumed.run()
    return out


def test_both_stages_are_logged_and_the_run_resumes(run_dir):
    records = [json.loads(line) for line in (run_dir / LOG_FILE).read_text().splitlines()]
    steps = [r for r in records if "stage" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["stage"] for r in steps] == ["vision", "vision", "chat", "chat"]
    assert all("loss" in r and "train_acc" in r for r in steps[2:])
    assert load_run_state(run_dir)["step"] == 4


def test_a_resumed_run_refuses_other_settings(run_dir):
    changed = smoke_config(run_dir, steps=5)
    changed.batch = 3
    with pytest.raises(ValueError, match="batch"):
        Trainer(changed)


def test_export_loads_in_both_services_and_all_in_one_with_the_trained_weights(run_dir, tmp_path):
    folder = export_checkpoint(run_dir, tmp_path / "ckpt", dtype="float16")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"] and config[DEMO_MODEL_MARKER] is True
    assert "ivl_random_weights" not in config and config["torch_dtype"] == "float16"
    assert read_checkpoint(folder).demo_model and not read_checkpoint(folder).random_weights

    allinone, tokenizer = load_allinone(folder)
    encoder = load_vision_encoder(folder)
    llm = build_causal_lm(read_checkpoint(folder), torch.float32, "cpu")
    state = load_run_state(run_dir)
    trained = build_model(spec_from_json(state["spec"]), build_tokenizer())
    trained.load_state_dict(state["model"])
    trained.eval()

    pixels = torch.randn(3, 3, 448, 448)
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    ids = torch.tensor([[5, 6, *([context] * 3 * 64), 7, 8]])
    with torch.inference_mode():
        reference = allinone(input_ids=ids, pixel_values=pixels).logits
        embeds = llm.get_input_embeddings()(ids).clone()
        visual = encoder.encode(pixels)
        embeds[0, 2 : 2 + 3 * 64] = visual.reshape(-1, visual.shape[-1])
        split = llm(inputs_embeds=embeds).logits
        before_export = trained(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(split, reference)
    assert (before_export - reference).abs().max() < 1e-2  # the fp16 rounding of the weights, nothing else


def test_pca_patch_init_whitens_the_patch_embedding():
    from ivl_train.model import demo_spec, pca_patch_init, sincos_position_init

    model = build_model(demo_spec("smoke"), build_tokenizer())
    tiles = torch.randn(4, 3, 448, 448) * torch.linspace(0.5, 2.0, 448)  # correlated, unequal variances
    pca_patch_init(model, tiles)
    sincos_position_init(model)
    with torch.inference_mode():
        out = model.model.vision_tower.embeddings.patch_embeddings(tiles)  # (N, patches, hidden)
    features = out.reshape(-1, out.shape[-1])
    assert features.mean(0).abs().max() < 0.05
    assert (features.std(0) - 1).abs().max() < 0.1  # unit variance per output channel
    positions = model.model.vision_tower.embeddings.position_embeddings[0]
    assert positions[0].abs().max() == 0 and positions[1:].std() > 0.1
