"""Loading the vision tower + projector from real tiny checkpoints of both layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ivl_proto.errors import ErrorCode, ServingError
from ivl_vision.checkpoint import load_vision_encoder
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import InternVLForConditionalGeneration


def pixels(count: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 448, 448, generator=torch.Generator().manual_seed(seed))


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(folder / shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                out[key] = handle.get_tensor(key)
    return out


def reference_internvit(t: dict[str, torch.Tensor], config: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """InternViT + pixel shuffle + mlp1 written out from the original layout's tensors (plain torch)."""
    vision = config["vision_config"]
    dim, heads = vision["hidden_size"], vision["num_attention_heads"]
    eps = vision["layer_norm_eps"]

    def norm(x: torch.Tensor, prefix: str) -> torch.Tensor:
        if vision["norm_type"] == "rms_norm":
            return t[prefix + ".weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        return F.layer_norm(x, (dim,), t[prefix + ".weight"], t[prefix + ".bias"], eps)

    x = F.conv2d(pixel_values, t["vision_model.embeddings.patch_embedding.weight"],
                 t["vision_model.embeddings.patch_embedding.bias"], stride=vision["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    n = x.shape[0]
    x = torch.cat([t["vision_model.embeddings.class_embedding"].expand(n, -1, -1), x], dim=1)
    x = x + t["vision_model.embeddings.position_embedding"]
    for i in range(vision["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        h = norm(x, p + "norm1")
        qkv = F.linear(h, t[p + "attn.qkv.weight"], t.get(p + "attn.qkv.bias"))
        q, k, v = qkv.reshape(n, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
        if vision["qk_normalization"]:
            def qk(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
                flat = z.transpose(1, 2).flatten(-2, -1)
                flat = weight * (flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + eps))
                return flat.view(n, -1, heads, dim // heads).transpose(1, 2)
            q, k = qk(q, t[p + "attn.q_norm.weight"]), qk(k, t[p + "attn.k_norm.weight"])
        attention = torch.softmax(q @ k.transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1) @ v
        attention = F.linear(attention.transpose(1, 2).reshape(n, -1, dim), t[p + "attn.proj.weight"], t[p + "attn.proj.bias"])
        x = x + t[p + "ls1"] * attention
        h = norm(x, p + "norm2")
        h = F.linear(F.gelu(F.linear(h, t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"])), t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"])
        x = x + t[p + "ls2"] * h
    x = x[:, 1:, :].reshape(n, 32, 32, dim)
    # reference pixel shuffle, scale 0.5
    x = x.view(n, 32, 16, dim * 2).permute(0, 2, 1, 3).contiguous().view(n, 16, 16, dim * 4)
    if config["ps_version"] == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, 256, dim * 4)
    x = F.layer_norm(x, (dim * 4,), t["mlp1.0.weight"], t["mlp1.0.bias"], 1e-5)
    x = F.gelu(F.linear(x, t["mlp1.1.weight"], t["mlp1.1.bias"]))
    return F.linear(x, t["mlp1.3.weight"], t["mlp1.3.bias"])


def test_both_layouts_give_identical_embeddings_and_info(tiny_original: Path, tiny_native: Path) -> None:
    original, native = load_vision_encoder(tiny_original), load_vision_encoder(tiny_native)
    x = pixels()
    a, b = original.encode(x), native.encode(x)
    assert a.shape == (2, 256, 64) and a.dtype == torch.float32
    assert (a - b).abs().max().item() == 0.0
    assert original.info.layout == "original" and native.info.layout == "native"
    assert original.info.fingerprint == native.info.fingerprint
    info = original.info
    assert (info.llm_hidden_size, info.vision_hidden_size, info.image_size, info.patch_size) == (64, 32, 448, 14)
    assert (info.tokens_per_tile, info.ps_version, info.select_layer, info.downsample_ratio) == (256, "v2", -1, 0.5)
    assert (info.template, info.flavour, info.default_max_tiles, info.default_min_tiles) == ("internlm2-chat", "300m", 12, 1)
    assert info.use_thumbnail and info.dynamic_image_size and (info.dtype, info.device) == ("float32", "cpu")
    assert info.model_id == tiny_original.name


def test_native_encoder_matches_transformers_full_model(tiny_native: Path) -> None:
    model = InternVLForConditionalGeneration.from_pretrained(tiny_native, dtype=torch.float32)
    x = pixels(1, seed=3)
    with torch.inference_mode():
        expected = model.model.get_image_features(pixel_values=x, vision_feature_layer=-1,
                                                  vision_feature_select_strategy="default").pooler_output
    assert (load_vision_encoder(tiny_native).encode(x) - expected).abs().max().item() == 0.0


@pytest.mark.parametrize(("ratio", "tokens"), [(1.0, 1024), (0.25, 64)])
def test_other_downsample_ratios_match_transformers_full_model(tiny_ckpt_factory, ratio: float, tokens: int) -> None:
    """pixel shuffle that folds nothing (1.0: every patch a token) or 4x4 patches (0.25), as transformers does it;
    both layouts; the token count per tile follows the ratio."""
    native = tiny_ckpt_factory("native", downsample_ratio=ratio)
    model = InternVLForConditionalGeneration.from_pretrained(native, dtype=torch.float32)
    x = pixels(1, seed=4)
    with torch.inference_mode():
        expected = model.model.get_image_features(pixel_values=x, vision_feature_layer=-1,
                                                  vision_feature_select_strategy="default").pooler_output
    for folder in (native, tiny_ckpt_factory("original", downsample_ratio=ratio)):
        encoder = load_vision_encoder(folder)
        assert encoder.info.tokens_per_tile == tokens and encoder.info.downsample_ratio == ratio
        got = encoder.encode(x)
        assert got.shape == expected.shape == (1, tokens, 64)
        assert (got - expected).abs().max().item() == 0.0


@pytest.mark.parametrize(("vision", "ps_version"), [("300m", "v2"), ("6b", "v2"), ("6b", "v1"), ("300m", "v1")])
def test_original_layout_matches_a_plain_torch_internvit(tiny_ckpt_factory, vision: str, ps_version: str) -> None:
    folder = tiny_ckpt_factory("original", vision=vision, ps_version=ps_version)
    config = json.loads((folder / "config.json").read_text())
    encoder = load_vision_encoder(folder)
    assert encoder.info.flavour == vision and encoder.info.ps_version == ps_version
    x = pixels(2, seed=1)
    with torch.inference_mode():
        expected = reference_internvit(read_all(folder), config, x)
    got = encoder.encode(x)
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4), (got - expected).abs().max()


def test_v1_checkpoint_is_the_v2_one_with_transposed_token_grids(tiny_ckpt_factory) -> None:
    v1 = load_vision_encoder(tiny_ckpt_factory("original", ps_version="v1"))
    v2 = load_vision_encoder(tiny_ckpt_factory("original", ps_version="v2"))
    x = pixels(2, seed=2)
    a, b = v1.encode(x).reshape(2, 16, 16, 64), v2.encode(x).reshape(2, 16, 16, 64)
    assert torch.equal(a.transpose(1, 2), b) and not torch.equal(a, b)
    assert v1.info.fingerprint != v2.info.fingerprint


@pytest.mark.parametrize("layout", ["original", "native"])
def test_loads_without_the_llm_shards(tiny_ckpt_factory, tmp_path: Path, layout: str) -> None:
    source = tiny_ckpt_factory(layout)
    folder = shutil.copytree(source, tmp_path / "vision-only")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    llm_prefixes = ("language_model.", "model.language_model.", "lm_head.")
    vision_shards = {shard for key, shard in weight_map.items() if not key.startswith(llm_prefixes)}
    llm_only = set(weight_map.values()) - vision_shards
    assert llm_only
    for shard in llm_only:
        (folder / shard).unlink()
    x = pixels(1)
    assert torch.equal(load_vision_encoder(folder).encode(x), load_vision_encoder(source).encode(x))


def test_missing_vision_tensor_names_the_key_and_the_file(tiny_original: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_original, tmp_path / "broken")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = "vision_model.encoder.layers.1.mlp.fc2.weight"
    shard = folder / index["weight_map"][key]
    with safe_open(str(shard), framework="pt") as handle:
        kept = {name: handle.get_tensor(name) for name in handle.keys() if name != key}  # noqa: SIM118
    save_file(kept, str(shard))
    with pytest.raises(ServingError) as error:
        load_vision_encoder(folder)
    assert error.value.code is ErrorCode.FAILED_PRECONDITION
    assert key in error.value.message and str(shard) in error.value.message
    # and when the index does not list it either
    del index["weight_map"][key]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ServingError, match=r"lacks tensor 'vision_model\.encoder\.layers\.1\.mlp\.fc2\.weight'.*index"):
        load_vision_encoder(folder)


def test_bad_folders_and_configs_get_clear_errors(tiny_original: Path, tmp_path: Path) -> None:
    with pytest.raises(ServingError, match="is not a folder"):
        load_vision_encoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServingError, match=r"has no config\.json"):
        load_vision_encoder(tmp_path / "empty")
    folder = shutil.copytree(tiny_original, tmp_path / "no-hidden")
    config = json.loads((folder / "config.json").read_text())
    del config["vision_config"]["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ServingError, match="vision_config has no 'hidden_size'"):
        load_vision_encoder(folder)
    config["vision_config"]["hidden_size"] = 48  # disagrees with the stored tensors
    config["vision_config"]["num_attention_heads"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ServingError, match=r"has shape"):
        load_vision_encoder(folder)


def test_select_layer_runs_and_loads_only_the_layers_it_needs(tiny_ckpt_factory) -> None:
    native = tiny_ckpt_factory("native", select_layer=-2, vision_layers=3)
    original = tiny_ckpt_factory("original", select_layer=-2, vision_layers=3)
    encoder = load_vision_encoder(original)
    assert encoder.info.vision_layers_run == 2 and len(encoder.vision_tower.encoder.layer) == 2
    model = InternVLForConditionalGeneration.from_pretrained(native, dtype=torch.float32)
    x = pixels(1, seed=4)
    with torch.inference_mode():
        expected = model.model.get_image_features(pixel_values=x, vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output
    assert torch.allclose(encoder.encode(x), expected, atol=1e-6)
    assert torch.equal(encoder.encode(x), load_vision_encoder(native).encode(x))


def test_bfloat16_and_bad_inputs(tiny_original: Path) -> None:
    fp32 = load_vision_encoder(tiny_original)
    bf16 = load_vision_encoder(tiny_original, dtype=torch.bfloat16)
    assert bf16.info.dtype == "bfloat16" and bf16.info.fingerprint != fp32.info.fingerprint
    x = pixels(1)
    out = bf16.encode(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), fp32.encode(x), atol=0.1, rtol=0.05)
    with pytest.raises(ServingError, match=r"shape \(N, 3, 448, 448\); got \(1, 3, 224, 224\)") as error:
        fp32.encode(torch.zeros(1, 3, 224, 224))
    assert error.value.code is ErrorCode.INVALID_ARGUMENT
    assert fp32.encode(torch.zeros(0, 3, 448, 448)).shape == (0, 256, 64)


def test_6b_qwen2_layouts_agree(tiny_ckpt_factory) -> None:
    original = load_vision_encoder(tiny_ckpt_factory("original", vision="6b", llm="qwen2"))
    native = load_vision_encoder(tiny_ckpt_factory("native", vision="6b", llm="qwen2"))
    x = pixels(1, seed=5)
    assert torch.equal(original.encode(x), native.encode(x))
    assert original.info.flavour == native.info.flavour == "6b"
    assert original.info.fingerprint == native.info.fingerprint
    assert original.info.template == native.info.template == "internvl2_5"
