"""LLM-only loading of both layouts; InternLM2 -> Llama mapping (wqkv split per KV group)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from ivl_llm import checkpoint as ckpt_module
from ivl_llm.checkpoint import build_causal_lm, load_state_dict, read_checkpoint, split_wqkv
from ivl_proto.errors import ServingError


def test_split_wqkv_unpacks_each_kv_group():
    heads, kv_heads, head_dim, hidden = 8, 2, 3, 5
    group = heads // kv_heads
    q = torch.randn(heads, head_dim, hidden)
    k = torch.randn(kv_heads, head_dim, hidden)
    v = torch.randn(kv_heads, head_dim, hidden)
    # InternLM2 packs per KV group: [q_g0 .. q_g(G-1), k, v] for each group.
    packed = torch.cat(
        [torch.cat([q[g * group : (g + 1) * group], k[g : g + 1], v[g : g + 1]]) for g in range(kv_heads)]
    ).reshape(-1, hidden)
    got_q, got_k, got_v = split_wqkv(packed, heads, kv_heads)
    assert torch.equal(got_q, q.reshape(-1, hidden))
    assert torch.equal(got_k, k.reshape(-1, hidden))
    assert torch.equal(got_v, v.reshape(-1, hidden))
    bias = torch.arange(kv_heads * (group + 2) * head_dim, dtype=torch.float32)
    bq, bk, bv = split_wqkv(bias, heads, kv_heads)
    assert bq.shape == (heads * head_dim,) and bk.shape == bv.shape == (kv_heads * head_dim,)
    assert bk[0] == group * head_dim and bv[0] == (group + 1) * head_dim


def test_configs_of_both_layouts(tiny_original, tiny_native, tiny_qwen2_original):
    original = read_checkpoint(tiny_original)
    native = read_checkpoint(tiny_native)
    assert (original.layout, original.llm_type, original.template) == ("original", "internlm2", "internlm2-chat")
    assert (native.layout, native.llm_type) == ("native", "llama")
    assert type(original.config).__name__ == "LlamaConfig"
    assert original.hidden_size == native.hidden_size == 64
    assert original.context_length == 32768
    qwen = read_checkpoint(tiny_qwen2_original, template="Hermes-2")
    assert (qwen.llm_type, qwen.template, type(qwen.config).__name__) == ("qwen2", "Hermes-2", "Qwen2Config")


@pytest.mark.parametrize(("original", "native"), [("tiny_original", "tiny_native"), ("tiny_qwen2_original", "tiny_qwen2_native")])
def test_original_layout_maps_onto_the_native_weights(request, original, native):
    from_original = load_state_dict(read_checkpoint(request.getfixturevalue(original)))
    from_native = load_state_dict(read_checkpoint(request.getfixturevalue(native)))
    assert sorted(from_original) == sorted(from_native)
    for key, tensor in from_native.items():
        assert torch.equal(from_original[key], tensor), key


def test_only_language_model_shards_are_opened(tiny_original, monkeypatch):
    index = json.loads((tiny_original / "model.safetensors.index.json").read_text())["weight_map"]
    vision_only = {s for s in index.values()} - {s for k, s in index.items() if k.startswith("language_model.")}
    assert vision_only, "the tiny writer keeps vision tensors in their own shard"
    opened: list[str] = []
    real_open = ckpt_module.safe_open

    def recording_open(path, **kwargs):
        opened.append(path.rsplit("/", 1)[-1])
        return real_open(path, **kwargs)

    monkeypatch.setattr(ckpt_module, "safe_open", recording_open)
    state = load_state_dict(read_checkpoint(tiny_original))
    assert opened and not set(opened) & vision_only
    assert not any("vision" in k or k.startswith("mlp1") for k in state)


def test_internlm2_original_and_native_give_the_same_logits(tiny_original, tiny_native):
    ids = torch.tensor([[1, 5, 9, 200, 17, 33]])
    with torch.inference_mode():
        a = build_causal_lm(read_checkpoint(tiny_original), torch.float32, "cpu")(input_ids=ids).logits
        b = build_causal_lm(read_checkpoint(tiny_native), torch.float32, "cpu")(input_ids=ids).logits
    assert torch.equal(a, b)


def test_a_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ServingError, match=r"has no config\.json"):
        read_checkpoint(tmp_path)


def test_missing_tensors_are_named(tiny_original, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_original, broken)
    config = json.loads((broken / "config.json").read_text())
    config["llm_config"]["num_hidden_layers"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ServingError, match=r"missing \['model.layers.2"):
        build_causal_lm(read_checkpoint(broken), torch.float32, "cpu")


def test_flash_attention_requests_of_real_configs_are_ignored(tiny_qwen2_original, tmp_path):
    patched = tmp_path / "flash"
    shutil.copytree(tiny_qwen2_original, patched)
    config = json.loads((patched / "config.json").read_text())
    config["llm_config"]["attn_implementation"] = "flash_attention_2"
    config["llm_config"]["auto_map"] = {"AutoModel": "modeling_qwen2.Qwen2Model"}
    (patched / "config.json").write_text(json.dumps(config))
    model = build_causal_lm(read_checkpoint(patched), torch.float32, "cpu")
    assert model.config._attn_implementation != "flash_attention_2"


def test_random_weights_marker_is_read_from_config(tiny_original, tmp_path):
    assert read_checkpoint(tiny_original).random_weights
    real_like = shutil.copytree(tiny_original, tmp_path / "real-like")
    config = json.loads((real_like / "config.json").read_text())
    del config["ivl_random_weights"]
    (real_like / "config.json").write_text(json.dumps(config))
    assert not read_checkpoint(real_like).random_weights
