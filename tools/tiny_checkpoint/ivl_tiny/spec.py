"""TinySpec: every size and switch of a tiny InternVL checkpoint, plus the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

VISION_FLAVOURS = ("300m", "6b")
LLM_KINDS = ("internlm2", "qwen2")
PS_VERSIONS = ("v1", "v2")
DTYPES = ("float32", "bfloat16", "float16")
TOKENIZERS = ("bpe", "sentencepiece")
DEFAULT_TEMPLATES = {"internlm2": "internlm2-chat", "qwen2": "internvl2_5"}


@dataclass(frozen=True)
class TinySpec:
    """What to write. The same spec (seed included) gives the same weights in every layout.

    vision "300m": LayerNorm + qkv bias (InternViT-300M style);
    vision "6b": RMSNorm + qk normalization, no qkv bias (InternViT-6B style). Both have layer scale.
    """

    vision: str = "300m"
    llm: str = "internlm2"
    ps_version: str = "v2"
    template: str | None = None  # None: "internlm2-chat" for internlm2, "internvl2_5" for qwen2
    seed: int = 0
    dtype: str = "float32"  # dtype of the stored tensors
    # vision tower
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    vision_norm_eps: float = 1e-6
    image_size: int = 448
    patch_size: int = 14
    # language model
    llm_hidden: int = 64
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_intermediate: int = 128
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    # InternVL glue
    select_layer: int = -1
    downsample_ratio: float = 0.5
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    dynamic_image_size: bool = True
    # tokenizer: "bpe" (tokenizers, byte-level, no BOS) or "sentencepiece" (InternLM2 only: tokenizer.model +
    # the checkpoint's own tokenizer class through trust_remote_code, BOS added, as the real InternLM2 releases)
    tokenizer: str = "bpe"
    tokenizer_merges_target: int = 512  # BPE vocabulary target before the special tokens are added
    sentencepiece_vocab: int = 640  # sentencepiece model size before the chat tokens (>= 256 byte pieces + chars)
    vocab_multiple: int = 64  # config vocab_size = len(tokenizer) rounded up to this

    def __post_init__(self) -> None:
        _check_choice("vision", self.vision, VISION_FLAVOURS)
        _check_choice("llm", self.llm, LLM_KINDS)
        _check_choice("ps_version", self.ps_version, PS_VERSIONS)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("tokenizer", self.tokenizer, TOKENIZERS)
        if self.tokenizer == "sentencepiece" and self.llm != "internlm2":
            raise ValueError("the sentencepiece tokenizer is InternLM2's; use it with llm internlm2")
        if self.vision_hidden % self.vision_heads:
            raise ValueError(f"vision_hidden {self.vision_hidden} is not divisible by vision_heads {self.vision_heads}")
        if self.llm_hidden % self.llm_heads:
            raise ValueError(f"llm_hidden {self.llm_hidden} is not divisible by llm_heads {self.llm_heads}")
        if self.llm_heads % self.llm_kv_heads:
            raise ValueError(f"llm_heads {self.llm_heads} is not divisible by llm_kv_heads {self.llm_kv_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        grid = self.image_size // self.patch_size
        scale = round(1 / self.downsample_ratio)
        if grid % scale:
            raise ValueError(f"the {grid}x{grid} patch grid does not fold by downsample_ratio {self.downsample_ratio}")

    @property
    def chat_template_name(self) -> str:
        return self.template if self.template is not None else DEFAULT_TEMPLATES[self.llm]

    @property
    def tokens_per_tile(self) -> int:
        grid = self.image_size // self.patch_size
        return int(grid * self.downsample_ratio) ** 2

    def replace(self, **changes: Any) -> TinySpec:
        return dataclasses.replace(self, **changes)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # 300M-style vision at real width, few layers; tiny LLM (encoder benchmarks)
    "encoder-heavy": {
        "vision_hidden": 1024, "vision_heads": 16, "vision_intermediate": 4096, "vision_layers": 4,
        "dtype": "bfloat16",
    },
    # the full 24-layer InternViT-300M; tiny LLM
    "300m-full": {
        "vision_hidden": 1024, "vision_heads": 16, "vision_intermediate": 4096, "vision_layers": 24,
        "dtype": "bfloat16",
    },
    # tiny vision + a Qwen2-0.5B-sized LLM (InternVL2-1B's language model)
    "qwen2-0.5b": {
        "llm": "qwen2", "llm_hidden": 896, "llm_layers": 24, "llm_heads": 14, "llm_kv_heads": 2,
        "llm_intermediate": 4864, "dtype": "bfloat16",
    },
}


def spec_from_preset(name: str, **overrides: Any) -> TinySpec:
    """A preset's sizes with the given fields replaced (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    fields.update({key: value for key, value in overrides.items() if value is not None})
    return TinySpec(**fields)
