"""The tiny-checkpoint writer: files, keys, configs, tokenizer and determinism of both layouts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from ivl_tiny import TinySpec, write_tiny_checkpoint
from ivl_tiny.__main__ import main as cli_main
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, InternVLForConditionalGeneration

SPECIAL = ("<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<|endoftext|>")


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[name] = handle.get_tensor(name)
    assert set(tensors) == set(index["weight_map"])
    return tensors


def shards_of(folder: Path, prefixes: tuple[str, ...]) -> set[str]:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return {shard for name, shard in weight_map.items() if name.startswith(prefixes)}


def test_original_layout_config_and_shards(tiny_original: Path) -> None:
    config = json.loads((tiny_original / "config.json").read_text())
    assert config["architectures"] == ["InternVLChatModel"]
    assert config["model_type"] == "internvl_chat"
    assert config["template"] == "internlm2-chat"
    assert (config["ps_version"], config["select_layer"], config["downsample_ratio"]) == ("v2", -1, 0.5)
    assert config["force_image_size"] == 448 and config["max_dynamic_patch"] == 12
    vision = config["vision_config"]
    assert vision["model_type"] == "intern_vit_6b" and vision["architectures"] == ["InternVisionModel"]
    assert (vision["qkv_bias"], vision["qk_normalization"], vision["norm_type"]) == (True, False, "layer_norm")
    llm = config["llm_config"]
    assert llm["architectures"] == ["InternLM2ForCausalLM"] and llm["model_type"] == "internlm2"
    vision_shards = shards_of(tiny_original, ("vision_model.", "mlp1."))
    llm_shards = shards_of(tiny_original, ("language_model.",))
    assert vision_shards and llm_shards and not vision_shards & llm_shards
    assert len(vision_shards | llm_shards) >= 2


def test_original_layout_keys_and_shapes(tiny_original: Path) -> None:
    spec = TinySpec()
    tensors = read_all(tiny_original)
    head_dim = spec.llm_hidden // spec.llm_heads
    expected_shapes = {
        "vision_model.embeddings.class_embedding": (1, 1, 32),
        "vision_model.embeddings.position_embedding": (1, 32 * 32 + 1, 32),
        "vision_model.embeddings.patch_embedding.weight": (32, 3, 14, 14),
        "vision_model.encoder.layers.1.attn.qkv.weight": (96, 32),
        "vision_model.encoder.layers.1.attn.qkv.bias": (96,),
        "vision_model.encoder.layers.1.attn.proj.weight": (32, 32),
        "vision_model.encoder.layers.1.ls1": (32,),
        "vision_model.encoder.layers.1.norm2.bias": (32,),
        "mlp1.0.weight": (128,),
        "mlp1.1.weight": (64, 128),
        "mlp1.3.weight": (64, 64),
        "language_model.model.layers.1.attention.wqkv.weight": ((4 + 2 * 2) * head_dim, 64),
        "language_model.model.layers.1.attention.wo.weight": (64, 64),
        "language_model.model.layers.1.feed_forward.w1.weight": (128, 64),
        "language_model.model.layers.1.feed_forward.w2.weight": (64, 128),
        "language_model.model.layers.1.attention_norm.weight": (64,),
        "language_model.model.norm.weight": (64,),
    }
    for name, shape in expected_shapes.items():
        assert tuple(tensors[name].shape) == shape, name
    vocab = json.loads((tiny_original / "config.json").read_text())["llm_config"]["vocab_size"]
    assert tuple(tensors["language_model.model.tok_embeddings.weight"].shape) == (vocab, 64)
    assert tuple(tensors["language_model.output.weight"].shape) == (vocab, 64)
    assert not any(name.startswith(("vision_tower", "model.", "lm_head")) for name in tensors)
    assert "vision_model.encoder.layers.0.attn.q_norm.weight" not in tensors


def test_native_layout_loads_in_transformers_with_the_written_weights(tiny_native: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_native)
    assert type(config).__name__ == "InternVLConfig"
    tokenizer = AutoTokenizer.from_pretrained(tiny_native)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    model = InternVLForConditionalGeneration.from_pretrained(tiny_native, dtype=torch.float32)
    written = read_all(tiny_native)
    state = model.state_dict()
    assert set(state) == set(written)
    for name, tensor in written.items():
        assert torch.equal(state[name], tensor), name
    vision_shards = shards_of(tiny_native, ("model.vision_tower.", "model.multi_modal_projector."))
    llm_shards = shards_of(tiny_native, ("model.language_model.", "lm_head."))
    assert not vision_shards & llm_shards
    ids = tokenizer("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 256 + "</img>hi<|im_end|>", return_tensors="pt")
    with torch.inference_mode():
        out = model(**ids, pixel_values=torch.randn(1, 3, 448, 448))
    assert out.logits.shape == (1, ids.input_ids.shape[1], config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all() and out.logits.std() > 0.1


def test_both_layouts_hold_the_same_weights(tiny_original: Path, tiny_native: Path) -> None:
    original, native = read_all(tiny_original), read_all(tiny_native)
    spec = TinySpec()
    qkv = original["vision_model.encoder.layers.0.attn.qkv.weight"]
    q, k, v = qkv.chunk(3, dim=0)
    assert torch.equal(q, native["model.vision_tower.encoder.layer.0.attention.q_proj.weight"])
    assert torch.equal(v, native["model.vision_tower.encoder.layer.0.attention.v_proj.weight"])
    assert torch.equal(k, native["model.vision_tower.encoder.layer.0.attention.k_proj.weight"])
    # InternLM2 packs wqkv per KV group: (n_kv, G + 2, head_dim, hidden)
    groups, head_dim = spec.llm_heads // spec.llm_kv_heads, spec.llm_hidden // spec.llm_heads
    wqkv = original["language_model.model.layers.1.attention.wqkv.weight"]
    packed = wqkv.view(spec.llm_kv_heads, groups + 2, head_dim, spec.llm_hidden)
    prefix = "model.language_model.layers.1.self_attn."
    assert torch.equal(packed[:, :groups].reshape(-1, spec.llm_hidden), native[prefix + "q_proj.weight"])
    assert torch.equal(packed[:, -2].reshape(-1, spec.llm_hidden), native[prefix + "k_proj.weight"])
    assert torch.equal(packed[:, -1].reshape(-1, spec.llm_hidden), native[prefix + "v_proj.weight"])
    pairs = {
        "mlp1.1.weight": "model.multi_modal_projector.linear_1.weight",
        "vision_model.encoder.layers.1.ls2": "model.vision_tower.encoder.layer.1.lambda_2",
        "language_model.model.layers.0.feed_forward.w3.weight": "model.language_model.layers.0.mlp.up_proj.weight",
        "language_model.output.weight": "lm_head.weight",
        "language_model.model.tok_embeddings.weight": "model.language_model.embed_tokens.weight",
    }
    for original_name, native_name in pairs.items():
        assert torch.equal(original[original_name], native[native_name]), original_name
    assert sum(t.numel() for t in original.values()) == sum(t.numel() for t in native.values())


def test_tokenizer_round_trip_and_special_tokens(tiny_original: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_original)
    special_ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL]
    assert len(set(special_ids)) == len(SPECIAL)
    for token, token_id in zip(SPECIAL, special_ids, strict=True):
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id], token
    text = "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>请描述这张图片 and a red panda.<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    # Chinese characters span several byte-level tokens: decoding a prefix may end mid-character
    chinese = tokenizer("书生", add_special_tokens=False).input_ids
    assert len(chinese) > 2 and "\ufffd" in tokenizer.decode(chinese[:1])
    config = json.loads((tiny_original / "config.json").read_text())
    assert config["llm_config"]["vocab_size"] >= len(tokenizer)
    generation = json.loads((tiny_original / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tiny_original / name).is_file()


def _digest(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_same_spec_same_bytes_and_seed_changes_weights(tmp_path: Path, tiny_original: Path) -> None:
    again = write_tiny_checkpoint(tmp_path / "again", TinySpec(), layout="original")
    assert _digest(again) == _digest(tiny_original)
    other = write_tiny_checkpoint(tmp_path / "seed1", TinySpec(seed=1), layout="original")
    first, second = read_all(tiny_original), read_all(other)
    assert set(first) == set(second)
    assert not torch.equal(first["mlp1.1.weight"], second["mlp1.1.weight"])


def test_6b_vision_and_qwen2_keys(tiny_ckpt_factory) -> None:
    folder = tiny_ckpt_factory("original", vision="6b", llm="qwen2", ps_version="v1")
    config = json.loads((folder / "config.json").read_text())
    assert config["vision_config"]["norm_type"] == "rms_norm" and config["vision_config"]["qk_normalization"]
    assert config["llm_config"]["architectures"] == ["Qwen2ForCausalLM"] and config["template"] == "internvl2_5"
    assert config["ps_version"] == "v1"
    tensors = read_all(folder)
    assert "vision_model.encoder.layers.0.attn.q_norm.weight" in tensors
    assert "vision_model.encoder.layers.0.attn.qkv.bias" not in tensors
    assert "vision_model.encoder.layers.0.norm1.bias" not in tensors
    assert "language_model.model.layers.0.self_attn.q_proj.bias" in tensors
    assert "language_model.lm_head.weight" in tensors


def test_cli_writes_and_refuses_a_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert cli_main(["--out", str(out), "--layout", "native", "--llm", "qwen2", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["InternVLForConditionalGeneration"]
    assert config["text_config"]["model_type"] == "qwen2"
    with pytest.raises(SystemExit, match="not empty"):
        cli_main(["--out", str(out)])


def test_spec_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="vision must be one of"):
        TinySpec(vision="1b")
    with pytest.raises(ValueError, match="not divisible by llm_kv_heads"):
        TinySpec(llm_heads=4, llm_kv_heads=3)
    with pytest.raises(ValueError, match="sentencepiece tokenizer is InternLM2's"):
        TinySpec(llm="qwen2", tokenizer="sentencepiece")


def test_cli_sentencepiece_variant_is_an_internlm2_release_lookalike(tmp_path: Path) -> None:
    out = tmp_path / "sp"
    assert cli_main(["--out", str(out), "--tokenizer", "sentencepiece"]) == 0
    assert {"tokenizer.model", "tokenization_ivl_internlm2.py", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    config = json.loads((out / "config.json").read_text())
    assert config["llm_config"]["vocab_size"] >= len(tokenizer)
    assert (config["llm_config"]["bos_token_id"], config["llm_config"]["eos_token_id"]) == (1, 2)
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id == 1
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)


@pytest.mark.parametrize("llm", ["internlm2", "qwen2"])
def test_native_layout_has_the_autoprocessor_files(tmp_path: Path, llm: str) -> None:
    """What transformers' InternVLProcessor reads, checked with transformers' own classes that import without
    torchvision (the bench venv also loads the whole AutoProcessor, bench/bench_vs_transformers_serve.py): the
    tokenizer's image tokens and a distinct video token, the GotOcr2 image processor (its pixels = our tiling),
    and the chat template (its prompt, expanded as InternVLProcessor expands it = the LLM service's prompt)."""
    import io

    import numpy as np
    from ivl_llm.prompt import expand_placeholders
    from ivl_llm.templates import ChatMessage, build_prompt, get_template
    from ivl_vision.image_io import ImageLimits
    from ivl_vision.preprocess import preprocess_trusted
    from ivl_vision.tiling import TilingConfig
    from PIL import Image
    from transformers import GotOcr2ImageProcessorPil

    folder = write_tiny_checkpoint(tmp_path / "native", TinySpec(llm=llm), layout="native")
    processor = json.loads((folder / "processor_config.json").read_text())
    assert processor["processor_class"] == "InternVLProcessor" and processor["image_seq_length"] == 256
    tokenizer = AutoTokenizer.from_pretrained(folder)
    names = ("start_image_token", "end_image_token", "context_image_token", "video_token")
    assert [getattr(tokenizer, name) for name in names] == ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    ids = [getattr(tokenizer, name + "_id") for name in names]
    assert len(set(ids)) == 4 and tokenizer.unk_token_id not in ids

    image_processor = GotOcr2ImageProcessorPil.from_pretrained(folder)
    assert image_processor.crop_to_patches and image_processor.max_patches == 12
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)).save(buffer, "PNG")
    ours = preprocess_trusted(buffer.getvalue(), TilingConfig(max_tiles=12), ImageLimits()).pixels
    theirs = image_processor(images=Image.open(buffer), return_tensors="np")
    assert np.array_equal(theirs["pixel_values"], ours) and int(theirs["num_patches"][0]) == ours.shape[0]

    question = "What is in the picture?"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        tokenize=False, add_generation_prompt=True)
    expanded = rendered.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * 256 * ours.shape[0] + "</img>", 1)
    template = get_template(TinySpec(llm=llm).chat_template_name)
    service_prompt = build_prompt(template, [ChatMessage("user", "<image>\n" + question)])
    assert expanded == expand_placeholders(service_prompt, [256 * ours.shape[0]])
