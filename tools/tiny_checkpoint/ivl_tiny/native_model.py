"""The transformers-native InternVL config of a TinySpec and its seeded random weights.

Every tensor is drawn from its own generator, seeded by (spec.seed, tensor name), so a tensor's
values do not depend on the others; both layouts are written from this one state dict.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    Qwen2Config,
)

from ivl_tiny.spec import TinySpec
from ivl_tiny.tokenizer import SpecialTokenIds

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NORM_MARKERS = ("layernorm", "layer_norm", "norm.", "q_norm", "k_norm")


def padded_vocab_size(tokenizer_len: int, multiple: int) -> int:
    return int(math.ceil(tokenizer_len / multiple) * multiple)


def llm_dimensions(spec: TinySpec, vocab_size: int) -> dict[str, Any]:
    """The LLM's shape in the config keys both layouts share (LlamaConfig / Qwen2Config and the original
    InternLM2 / Qwen2 config.json sections)."""
    return {
        "hidden_size": spec.llm_hidden,
        "intermediate_size": spec.llm_intermediate,
        "num_hidden_layers": spec.llm_layers,
        "num_attention_heads": spec.llm_heads,
        "num_key_value_heads": spec.llm_kv_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
    }


def build_native_config(spec: TinySpec, ids: SpecialTokenIds, vocab_size: int) -> InternVLConfig:
    big_vision = spec.vision == "6b"
    vision = InternVLVisionConfig(
        hidden_size=spec.vision_hidden,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        intermediate_size=spec.vision_intermediate,
        attention_bias=not big_vision,
        use_qk_norm=big_vision,
        norm_type="rms_norm" if big_vision else "layer_norm",
        layer_norm_eps=spec.vision_norm_eps,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_act="gelu",
        use_mean_pooling=True,  # no final norm, as in InternViT
        layer_scale_init_value=1.0,
    )
    text_kwargs = {**llm_dimensions(spec, vocab_size), "tie_word_embeddings": False}
    if spec.llm == "internlm2":
        text = LlamaConfig(
            **text_kwargs, attention_bias=False, bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.eos
        )
    else:
        text = Qwen2Config(
            **text_kwargs, bos_token_id=ids.endoftext, eos_token_id=ids.im_end, pad_token_id=ids.endoftext
        )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids.img_context,
        image_seq_length=spec.tokens_per_tile,
        downsample_ratio=spec.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=spec.select_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    config.dtype = spec.dtype
    return config


def native_shapes(config: InternVLConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of InternVLForConditionalGeneration, built on the meta device."""
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _draw(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    normal = torch.randn(shape, generator=generator, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("lambda_1", "lambda_2"):
        return 0.5 + 0.1 * normal  # layer scale
    if any(marker in name for marker in NORM_MARKERS) or name.endswith("_norm.weight"):
        return 1.0 + 0.1 * normal if leaf == "weight" else 0.05 * normal
    if leaf == "bias":
        return 0.05 * normal
    if leaf in ("cls_token", "position_embeddings"):
        return 0.1 * normal
    if "embed_tokens" in name:
        return normal
    if name.startswith("lm_head"):
        return normal * (2.0 / math.sqrt(shape[1]))
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return normal / math.sqrt(fan_in)


def random_native_state_dict(config: InternVLConfig, spec: TinySpec) -> dict[str, torch.Tensor]:
    dtype = TORCH_DTYPES[spec.dtype]
    return {
        name: _draw(name, shape, spec.seed).to(dtype).contiguous()
        for name, shape in native_shapes(config).items()
    }
