"""The OpenGVLab layout (InternVLChatModel): key mapping from the native names and config.json."""

from __future__ import annotations

import re
from typing import Any

import torch

from ivl_tiny.native_model import llm_dimensions
from ivl_tiny.spec import TinySpec
from ivl_tiny.tokenizer import SpecialTokenIds

_VISION_RENAMES = (
    (r"^model\.vision_tower\.embeddings\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^model\.vision_tower\.embeddings\.position_embeddings$", "vision_model.embeddings.position_embedding"),
    (r"^model\.vision_tower\.embeddings\.patch_embeddings\.projection\.", "vision_model.embeddings.patch_embedding."),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.lambda_1$", r"vision_model.encoder.layers.\1.ls1"),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.lambda_2$", r"vision_model.encoder.layers.\1.ls2"),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"vision_model.encoder.layers.\1.attn.proj."),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.(q_norm|k_norm)\.", r"vision_model.encoder.layers.\1.attn.\2."),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_before\.", r"vision_model.encoder.layers.\1.norm1."),
    (r"^model\.vision_tower\.encoder\.layer\.(\d+)\.layernorm_after\.", r"vision_model.encoder.layers.\1.norm2."),
    (r"^model\.multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^model\.multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^model\.multi_modal_projector\.linear_2\.", "mlp1.3."),
)
_INTERNLM2_RENAMES = (
    (r"^model\.language_model\.embed_tokens\.", "language_model.model.tok_embeddings."),
    (r"^model\.language_model\.norm\.", "language_model.model.norm."),
    (r"^model\.language_model\.layers\.(\d+)\.self_attn\.o_proj\.", r"language_model.model.layers.\1.attention.wo."),
    (r"^model\.language_model\.layers\.(\d+)\.mlp\.gate_proj\.", r"language_model.model.layers.\1.feed_forward.w1."),
    (r"^model\.language_model\.layers\.(\d+)\.mlp\.up_proj\.", r"language_model.model.layers.\1.feed_forward.w3."),
    (r"^model\.language_model\.layers\.(\d+)\.mlp\.down_proj\.", r"language_model.model.layers.\1.feed_forward.w2."),
    (r"^model\.language_model\.layers\.(\d+)\.input_layernorm\.", r"language_model.model.layers.\1.attention_norm."),
    (r"^model\.language_model\.layers\.(\d+)\.post_attention_layernorm\.", r"language_model.model.layers.\1.ffn_norm."),
    (r"^lm_head\.", "language_model.output."),
)
_QWEN2_RENAMES = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
)
_VISION_QKV = re.compile(r"^model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)$")
_LLM_QKV = re.compile(r"^model\.language_model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight$")


def _rename(name: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    return None


def pack_internlm2_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_kv: int) -> torch.Tensor:
    """InternLM2 wqkv rows: per KV group, its G query heads, then its key head, then its value head."""
    hidden = q.shape[1]
    head_dim = k.shape[0] // n_kv
    groups = q.shape[0] // (n_kv * head_dim)
    packed = torch.cat(
        [
            q.reshape(n_kv, groups, head_dim, hidden),
            k.reshape(n_kv, 1, head_dim, hidden),
            v.reshape(n_kv, 1, head_dim, hidden),
        ],
        dim=1,
    )
    return packed.reshape(n_kv * (groups + 2) * head_dim, hidden).contiguous()


def to_original_state_dict(native: dict[str, torch.Tensor], spec: TinySpec) -> dict[str, torch.Tensor]:
    llm_rules = _INTERNLM2_RENAMES if spec.llm == "internlm2" else _QWEN2_RENAMES
    out: dict[str, torch.Tensor] = {}
    vision_qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    llm_qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in native.items():
        if match := _VISION_QKV.match(name):
            vision_qkv.setdefault((match[1], match[3]), {})[match[2]] = tensor
            continue
        if spec.llm == "internlm2" and (match := _LLM_QKV.match(name)):
            llm_qkv.setdefault(match[1], {})[match[2]] = tensor
            continue
        renamed = _rename(name, _VISION_RENAMES) or _rename(name, llm_rules)
        if renamed is None:
            raise KeyError(f"no original-layout name for native tensor {name}")
        out[renamed] = tensor
    for (layer, kind), parts in sorted(vision_qkv.items()):
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0).contiguous()
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = fused
    for layer, parts in sorted(llm_qkv.items()):
        out[f"language_model.model.layers.{layer}.attention.wqkv.weight"] = pack_internlm2_wqkv(
            parts["q"], parts["k"], parts["v"], spec.llm_kv_heads
        )
    return dict(sorted(out.items(), key=lambda item: _order_key(item[0])))


def _order_key(name: str) -> tuple[int, str]:
    return (0 if name.startswith("vision_model.") else 1 if name.startswith("mlp1.") else 2, name)


def original_config(spec: TinySpec, ids: SpecialTokenIds, vocab_size: int) -> dict[str, Any]:
    big_vision = spec.vision == "6b"
    vision_config = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_intermediate,
        "num_attention_heads": spec.vision_heads,
        "num_hidden_layers": spec.vision_layers,
        "num_channels": 3,
        "image_size": spec.image_size,
        "patch_size": spec.patch_size,
        "qkv_bias": not big_vision,
        "qk_normalization": big_vision,
        "norm_type": "rms_norm" if big_vision else "layer_norm",
        "layer_norm_eps": spec.vision_norm_eps,
        "hidden_act": "gelu",
        "initializer_factor": 0.1,
        "initializer_range": 1e-10 if big_vision else 0.02,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "use_flash_attn": False,
        "torch_dtype": spec.dtype,
    }
    common_llm = {
        **llm_dimensions(spec, vocab_size),
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": spec.dtype,
    }
    if spec.llm == "internlm2":
        llm_config = {
            "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2",
            **common_llm,
            "bias": False,
            "rope_scaling": None,
            "attn_implementation": "eager",
            "bos_token_id": ids.bos,
            "eos_token_id": ids.eos,
            "pad_token_id": ids.eos,
        }
    else:
        llm_config = {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **common_llm,
            "attention_dropout": 0.0,
            "max_window_layers": spec.llm_layers,
            "sliding_window": spec.max_position_embeddings,
            "use_sliding_window": False,
            "rope_scaling": None,
            "attn_implementation": "eager",
            "bos_token_id": ids.endoftext,
            "eos_token_id": ids.im_end,
        }
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "template": spec.chat_template_name,
        "select_layer": spec.select_layer,
        "downsample_ratio": spec.downsample_ratio,
        "ps_version": spec.ps_version,
        "force_image_size": spec.image_size,
        "dynamic_image_size": spec.dynamic_image_size,
        "use_thumbnail": spec.use_thumbnail,
        "max_dynamic_patch": spec.max_dynamic_patch,
        "min_dynamic_patch": spec.min_dynamic_patch,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": spec.dtype,
        "vision_config": vision_config,
        "llm_config": llm_config,
    }
