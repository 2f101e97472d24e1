"""Loading only the language model of an InternVL checkpoint, from either layout.

- Original OpenGVLab layout (architectures InternVLChatModel): `llm_config` + `language_model.*` keys.
  InternLM2 LLMs are mapped onto transformers' Llama classes (fused wqkv split per KV group, keys
  renamed); Qwen2 / Phi3 / Llama LLMs load as they are.
- transformers-native layout (InternVLForConditionalGeneration): `text_config` + keys
  `language_model.model.*` / `language_model.lm_head.*` or (transformers 5) `model.language_model.*` /
  `lm_head.*`.
Only language-model tensors are read from the safetensors shards (the index maps keys to shards).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ivl_proto.checkpoint_layout import detect_layout, read_checkpoint_config
from ivl_proto.errors import ErrorCode, ServingError, invalid
from safetensors import safe_open

from ivl_llm.system_messages import SystemMessageChoice, resolve_system_message

INTERNLM2_RENAMES = (
    ("model.tok_embeddings.", "model.embed_tokens."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)
# Default templates of transformers-native checkpoints, which do not name theirs.
NATIVE_TEMPLATES = {"llama": "internlm2-chat", "qwen2": "internvl2_5", "phi3": "phi3-chat"}
WQKV = re.compile(r"^(model\.layers\.\d+\.)attention\.wqkv\.(weight|bias)$")


@dataclass(frozen=True)
class LLMCheckpoint:
    path: Path
    layout: str  # "original" | "native"
    llm_type: str  # model_type of the LLM as stored: internlm2, qwen2, phi3, llama
    config: Any  # the transformers config of the causal LM that will run it
    template: str
    system_message: str  # the default system message (see ivl_llm.system_messages)
    # config.json's "ivl_random_weights" (written by ivl_tiny): the replies of such a model are noise
    random_weights: bool = False
    system_message_source: str = "override"  # where system_message came from
    # config.json's "ivl_demo_model" (written by ivl_train): the trained tiny demo model
    demo_model: bool = False

    @property
    def model_id(self) -> str:
        return self.path.name

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def context_length(self) -> int:
        return int(self.config.max_position_embeddings)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ServingError(ErrorCode.FAILED_PRECONDITION, f"{path} does not exist; is model_path a checkpoint folder?") from None


def _internlm2_to_llama_config(cfg: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", 10000.0),
        rope_scaling=cfg.get("rope_scaling"),
        attention_bias=bool(cfg.get("bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        pad_token_id=cfg.get("pad_token_id"),
    )


def _plain_config(cfg: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    # Real InternVL configs may ask for flash attention (CUDA-only); the backend picks the attention.
    dropped = ("model_type", "auto_map", "_name_or_path", "attn_implementation", "_attn_implementation", "use_flash_attn")
    values = {k: v for k, v in cfg.items() if k not in dropped}
    return AutoConfig.for_model(cfg["model_type"], **values)


def read_checkpoint(path: str | Path, template: str = "", system_message: str | None = None) -> LLMCheckpoint:
    """Read config.json and decide how the language model loads; no tensors are read here."""
    folder = Path(path)
    config = read_checkpoint_config(folder)
    layout = detect_layout(config, folder / "config.json")
    section = "llm_config" if layout == "original" else "text_config"
    if not isinstance(config.get(section), dict):
        raise ServingError(
            ErrorCode.FAILED_PRECONDITION,
            f"{folder / 'config.json'} is an InternVL config of the {layout} layout without its {section} "
            "section (the language model's config)",
        )
    llm_cfg = dict(config[section])
    if layout == "original":
        llm_type = llm_cfg.get("model_type") or _type_from_architectures(llm_cfg.get("architectures") or [])
        llm_cfg["model_type"] = llm_type
        default_template = config.get("template") or "internlm2-chat"
    else:
        llm_type = llm_cfg.get("model_type", "qwen2")
        default_template = config.get("template") or NATIVE_TEMPLATES.get(llm_type, "internvl2_5")
    built = _internlm2_to_llama_config(llm_cfg) if llm_type == "internlm2" else _plain_config(llm_cfg)
    template = template or default_template
    if system_message is not None:
        choice = SystemMessageChoice(system_message, "override")
    else:
        choice = resolve_system_message(folder, config, template)
    return LLMCheckpoint(
        path=folder,
        layout=layout,
        llm_type=llm_type,
        config=built,
        template=template,
        system_message=choice.text,
        random_weights=bool(config.get("ivl_random_weights", False)),
        system_message_source=choice.source,
        demo_model=bool(config.get("ivl_demo_model", False)),
    )


def _type_from_architectures(architectures: list[str]) -> str:
    for name, kind in (("InternLM2", "internlm2"), ("Qwen2", "qwen2"), ("Phi3", "phi3"), ("Llama", "llama")):
        if any(a.startswith(name) for a in architectures):
            return kind
    raise invalid(f"unsupported LLM architectures {architectures}; supported: InternLM2, Qwen2, Phi3, Llama")


def map_key(key: str, layout: str) -> str | None:
    """The causal-LM key a checkpoint key becomes, or None for keys that are not the language model's."""
    for prefix, replacement in (
        ("language_model.", ""),
        ("model.language_model.", "model."),
    ):
        if key.startswith(prefix):
            return replacement + key[len(prefix) :]
    if layout == "native" and key.startswith("lm_head."):
        return key
    return None


def _shards(folder: Path) -> dict[str, list[str]]:
    """shard file -> its keys (from the index, or the single model.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        by_shard: dict[str, list[str]] = {}
        for key, shard in _read_json(index)["weight_map"].items():
            by_shard.setdefault(shard, []).append(key)
        return by_shard
    single = folder / "model.safetensors"
    if not single.exists():
        raise ServingError(ErrorCode.FAILED_PRECONDITION, f"no model.safetensors(.index.json) in {folder}")
    with safe_open(str(single), framework="pt") as handle:
        return {"model.safetensors": list(handle.keys())}


def iter_language_tensors(ckpt: LLMCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """(mapped key, tensor) for every language-model tensor; other tensors are never read."""
    for shard, keys in _shards(ckpt.path).items():
        wanted = [(k, m) for k in keys if (m := map_key(k, ckpt.layout)) is not None]
        if not wanted:
            continue
        with safe_open(str(ckpt.path / shard), framework="pt") as handle:
            for key, mapped in wanted:
                yield mapped, handle.get_tensor(key)


def split_wqkv(tensor: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, ...]:
    """InternLM2's fused wqkv, packed per KV group as (n_kv, G + 2, head_dim, ...): q, k, v."""
    group = num_heads // num_kv_heads
    head_dim = tensor.shape[0] // (num_kv_heads * (group + 2))
    packed = tensor.reshape(num_kv_heads, group + 2, head_dim, *tensor.shape[1:])
    q = packed[:, :group].reshape(num_heads * head_dim, *tensor.shape[1:])
    k = packed[:, group].reshape(num_kv_heads * head_dim, *tensor.shape[1:])
    v = packed[:, group + 1].reshape(num_kv_heads * head_dim, *tensor.shape[1:])
    return q.contiguous(), k.contiguous(), v.contiguous()


def internlm2_to_llama(key: str, tensor: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]]:
    match = WQKV.match(key)
    if match:
        layer, kind = match.groups()
        q, k, v = split_wqkv(tensor, config.num_attention_heads, config.num_key_value_heads)
        return [(f"{layer}self_attn.{n}_proj.{kind}", t) for n, t in (("q", q), ("k", k), ("v", v))]
    if key.startswith("output."):
        return [("lm_head." + key[len("output.") :], tensor)]
    for old, new in INTERNLM2_RENAMES:
        key = key.replace(old, new)
    return [(key, tensor)]


def load_state_dict(ckpt: LLMCheckpoint) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, tensor in iter_language_tensors(ckpt):
        if ckpt.llm_type == "internlm2" and ckpt.layout == "original":
            state.update(internlm2_to_llama(key, tensor, ckpt.config))
        else:
            state[key] = tensor
    if not state:
        raise ServingError(ErrorCode.FAILED_PRECONDITION, f"no language-model tensors found in {ckpt.path}")
    return state


def build_causal_lm(ckpt: LLMCheckpoint, dtype: torch.dtype, device: str) -> Any:
    """The causal LM with the checkpoint's weights, in eval mode, on `device`."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(ckpt.config, dtype=torch.float32)
    state = load_state_dict(ckpt)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and ckpt.config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise ServingError(
            ErrorCode.FAILED_PRECONDITION,
            f"the language model in {ckpt.path} does not match its config: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}",
        )
    if ckpt.config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # quiet "model of type internvl_chat" from reading config.json
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as error:
        hint = "" if trust_remote_code else " (real InternLM2 checkpoints need IVL_LLM_TRUST_REMOTE_CODE=true)"
        raise ServingError(
            ErrorCode.FAILED_PRECONDITION, f"could not load the tokenizer from {path}: {error}{hint}"
        ) from error
    finally:
        hf_logging.set_verbosity(verbosity)
