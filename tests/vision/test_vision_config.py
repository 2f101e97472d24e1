"""config.json of real releases (both layouts) parses: tolerant of extra fields, strict on needed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ivl_proto.errors import ServingError
from ivl_vision.checkpoint_config import read_config

# The shape of OpenGVLab/InternVL-Chat-V1-5's config.json (abridged: the fields that matter plus
# a sample of the extra ones real releases carry).
CHAT_V1_5 = {
    "_commit_hash": None,
    "architectures": ["InternVLChatModel"],
    "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                 "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
    "downsample_ratio": 0.5,
    "dynamic_image_size": True,
    "force_image_size": 448,
    "llm_config": {
        "architectures": ["InternLM2ForCausalLM"], "attn_implementation": "eager", "bias": False,
        "hidden_size": 6144, "intermediate_size": 16384, "model_type": "internlm2", "num_attention_heads": 48,
        "num_hidden_layers": 48, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 2.0, "type": "dynamic"}, "rope_theta": 1000000, "vocab_size": 92553,
    },
    "max_dynamic_patch": 12,
    "min_dynamic_patch": 1,
    "model_type": "internvl_chat",
    "pad2square": False,
    "ps_version": "v1",
    "select_layer": -1,
    "template": "internlm2-chat",
    "torch_dtype": "bfloat16",
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
    "use_thumbnail": True,
    "vision_config": {
        "architectures": ["InternVisionModel"], "attention_dropout": 0.0, "drop_path_rate": 0.0, "dropout": 0.0,
        "hidden_act": "gelu", "hidden_size": 3200, "image_size": 448, "initializer_factor": 0.1,
        "initializer_range": 1e-10, "intermediate_size": 12800, "layer_norm_eps": 1e-06,
        "model_type": "intern_vit_6b", "norm_type": "rms_norm", "num_attention_heads": 25, "num_channels": 3,
        "num_hidden_layers": 45, "patch_size": 14, "qk_normalization": True, "qkv_bias": False,
        "torch_dtype": "bfloat16", "use_flash_attn": True, "output_attentions": False, "tie_word_embeddings": True,
    },
}

# The shape of an InternVL "-hf" (transformers-native) release's config.json, abridged.
NATIVE_HF = {
    "architectures": ["InternVLForConditionalGeneration"],
    "downsample_ratio": 0.5,
    "image_seq_length": 256,
    "image_token_id": 151667,
    "model_type": "internvl",
    "projector_hidden_act": "gelu",
    "text_config": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "model_type": "qwen2",
                    "num_hidden_layers": 24, "vocab_size": 151674},
    "torch_dtype": "bfloat16",
    "vision_config": {
        "architectures": ["InternVisionModel"], "attention_bias": True, "attention_dropout": 0.0,
        "dropout": 0.0, "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "hidden_size": 1024,
        "image_size": [448, 448], "initializer_factor": 0.1, "initializer_range": 1e-10,
        "intermediate_size": 4096, "layer_norm_eps": 1e-06, "layer_scale_init_value": 0.1,
        "model_type": "internvl_vision", "norm_type": "layer_norm", "num_attention_heads": 16,
        "num_channels": 3, "num_hidden_layers": 24, "patch_size": [14, 14], "projection_dropout": 0.0,
        "use_absolute_position_embeddings": True, "use_mask_token": False, "use_mean_pooling": True,
        "use_qk_norm": False,
    },
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
}


def write(folder: Path, config: dict, preprocessor: dict | None = None) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


def test_internvl_chat_v1_5_config(tmp_path: Path) -> None:
    config = read_config(write(tmp_path / "v15", CHAT_V1_5))
    assert config.layout == "original" and config.flavour == "6b"
    assert (config.tower.hidden_size, config.tower.num_hidden_layers, config.tower.num_attention_heads) == (3200, 45, 25)
    assert config.tower.use_qk_norm and not config.tower.attention_bias and config.tower.norm_type == "rms_norm"
    assert (config.llm_hidden_size, config.ps_version, config.tokens_per_tile, config.layers_to_run) == (6144, "v1", 256, 45)
    assert (config.template, config.max_dynamic_patch, config.use_thumbnail) == ("internlm2-chat", 12, True)


def test_native_hf_config_with_preprocessor_tiling(tmp_path: Path) -> None:
    folder = write(tmp_path / "hf", NATIVE_HF, {"crop_to_patches": True, "max_patches": 6, "min_patches": 1})
    config = read_config(folder)
    assert config.layout == "native" and config.flavour == "300m" and config.ps_version == "v2"
    assert (config.tower.hidden_size, config.tower.image_size, config.tower.patch_size) == (1024, 448, 14)
    assert (config.llm_hidden_size, config.max_dynamic_patch, config.template) == (896, 6, "")


def test_missing_needed_fields_are_named(tmp_path: Path) -> None:
    broken = json.loads(json.dumps(CHAT_V1_5))
    del broken["llm_config"]["hidden_size"]
    with pytest.raises(ServingError, match="llm_config has no 'hidden_size'"):
        read_config(write(tmp_path / "a", broken))
    native = json.loads(json.dumps(NATIVE_HF))
    native["vision_feature_select_strategy"] = "full"
    with pytest.raises(ServingError, match="vision_feature_select_strategy 'full'"):
        read_config(write(tmp_path / "b", native))
    with pytest.raises(ServingError, match="neither an OpenGVLab InternVL config"):
        read_config(write(tmp_path / "c", {"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    bad = json.loads(json.dumps(CHAT_V1_5))
    bad["ps_version"], bad["select_layer"] = "v3", -50
    with pytest.raises(ServingError, match=r"ps_version 'v3'.*select_layer -50"):
        read_config(write(tmp_path / "d", bad))
