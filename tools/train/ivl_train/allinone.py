"""transformers' all-in-one InternVLForConditionalGeneration from an original-layout (InternVLChatModel)
checkpoint with an InternViT-300M-style tower and a Qwen2 LLM: the reference the split stack is checked
against. The key mapping is written here on its own (the inverse of ivl_tiny's), not borrowed from the
services' loaders, so the check does not share their code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

_RULES = (
    (r"^vision_model\.embeddings\.class_embedding$", "model.vision_tower.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "model.vision_tower.embeddings.position_embeddings"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "model.vision_tower.embeddings.patch_embeddings.projection."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls1$", r"model.vision_tower.encoder.layer.\1.lambda_1"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls2$", r"model.vision_tower.encoder.layer.\1.lambda_2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.", r"model.vision_tower.encoder.layer.\1.attention.projection_layer."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"model.vision_tower.encoder.layer.\1.mlp."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.", r"model.vision_tower.encoder.layer.\1.layernorm_before."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.", r"model.vision_tower.encoder.layer.\1.layernorm_after."),
    (r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
)
_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)$")


def native_tensors(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in original.items():
        if match := _QKV.match(name):
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                out[f"model.vision_tower.encoder.layer.{match[1]}.attention.{part}_proj.{match[2]}"] = chunk
            continue
        for pattern, replacement in _RULES:
            renamed, count = re.subn(pattern, replacement, name)
            if count:
                out[renamed] = tensor
                break
        else:
            raise KeyError(f"no transformers-native name for checkpoint tensor {name}")
    return out


def native_config(config: dict[str, Any], image_token_id: int) -> InternVLConfig:
    vision = config["vision_config"]
    llm = dict(config["llm_config"])
    if llm.get("model_type") != "qwen2" or vision.get("qk_normalization") or vision.get("norm_type") != "layer_norm":
        raise ValueError("the all-in-one reference here handles InternViT-300M-style towers with a Qwen2 LLM only")
    vision_config = InternVLVisionConfig(
        hidden_size=vision["hidden_size"], num_hidden_layers=vision["num_hidden_layers"],
        num_attention_heads=vision["num_attention_heads"], intermediate_size=vision["intermediate_size"],
        attention_bias=bool(vision["qkv_bias"]), use_qk_norm=False, norm_type="layer_norm",
        layer_norm_eps=vision["layer_norm_eps"], image_size=vision["image_size"], patch_size=vision["patch_size"],
        hidden_act=vision["hidden_act"], use_mean_pooling=True,
    )
    dropped = ("architectures", "model_type", "torch_dtype", "attn_implementation")
    text_config = Qwen2Config(**{k: v for k, v in llm.items() if k not in dropped})
    if config.get("ps_version", "v1") != "v2":
        raise ValueError("transformers' InternVL pixel shuffle is ps_version v2")
    native = InternVLConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
        image_seq_length=(vision["image_size"] // vision["patch_size"] // 2) ** 2,
        downsample_ratio=config["downsample_ratio"], projector_hidden_act="gelu",
        vision_feature_layer=config["select_layer"], vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    return native


def load_allinone(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, PreTrainedTokenizerFast]:
    """(InternVLForConditionalGeneration in eval mode, its tokenizer) from the checkpoint folder."""
    folder = Path(path)
    config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = InternVLForConditionalGeneration(native_config(config, tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")))
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    original: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(folder / shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                original[key] = handle.get_tensor(key)
    result = model.load_state_dict(native_tensors(original), strict=True)
    del result
    return model.to(dtype).eval(), tokenizer
