"""Offline tokenizers with InternVL's special tokens, trained in code: a byte-level BPE (tokenizers) and,
like the real InternLM2 releases, a sentencepiece model behind a tokenizer class of the checkpoint's own
(tokenization_ivl_internlm2.py, loaded through trust_remote_code)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Trained first, so they get ids 0, 1, 2 as in InternLM2's vocabulary.
BASE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
# Added after the learned vocabulary, as the real releases do (InternLM2: 92542..92546).
# "<video>": the distinct video token transformers' InternVLProcessor requires (the -hf releases have one).
ADDED_SPECIAL_TOKENS = ("<|im_end|>", "<|im_start|>", "<img>", "</img>", "<IMG_CONTEXT>", "<|endoftext|>", "<video>")
# In the sentencepiece variant the chat tokens are user-defined symbols at the end of the model's own
# vocabulary (InternLM2: '<|im_end|>' 92542, '<|im_start|>' 92543 of 92544); InternVL's tokens follow
# as added tokens, as InternVL's releases add them (92544 '<img>', ...).
SENTENCEPIECE_CHAT_TOKENS = ("<|im_end|>", "<|im_start|>")
SENTENCEPIECE_ADDED_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<|endoftext|>")
TOKENIZER_KINDS = ("bpe", "sentencepiece")

CORPUS = (
    "You are an AI assistant whose name is InternLM.",
    "Describe this image in detail. The image shows a red panda sitting on a wooden platform.",
    "What is in the picture? A cat, a dog and two birds are standing near the river bank.",
    "Please answer the question with a single word or phrase. The answer is yes.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } , . ! ? : ;",
    "Image-1: <image>\nImage-2: <image>\nCompare the two charts and summarise the trend.",
    "The document says: total revenue grew by 12.5% in 2024, while costs fell.",
    "请描述这张图片。图片中有一只小熊猫坐在木头平台上。",
    "你好，我是书生·浦语，一个人工智能助手。这是什么？这是一只猫和一只狗。",
    "图像里有一座山、一条河和几棵树。天空是蓝色的。",
    "def main():\n    print('hello world')\n    return 0\n",
)


@dataclass(frozen=True)
class SpecialTokenIds:
    unk: int
    bos: int
    eos: int
    im_end: int
    im_start: int
    img_start: int
    img_end: int
    img_context: int
    endoftext: int


def build_tokenizer(merges_target: int, pad_token: str) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on the built-in corpus and wrap it with the special tokens."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=merges_target,
        special_tokens=list(BASE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=pad_token,
        additional_special_tokens=list(ADDED_SPECIAL_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    return tokenizer


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> SpecialTokenIds:
    def one(token: str) -> int:
        ids = tokenizer.convert_tokens_to_ids([token])
        if len(ids) != 1 or ids[0] is None or (ids[0] == tokenizer.unk_token_id and token != "<unk>"):
            raise RuntimeError(f"special token {token} is not a single id in the tiny tokenizer")
        return int(ids[0])

    return SpecialTokenIds(
        unk=one("<unk>"), bos=one("<s>"), eos=one("</s>"), im_end=one("<|im_end|>"),
        im_start=one("<|im_start|>"), img_start=one("<img>"), img_end=one("</img>"),
        img_context=one("<IMG_CONTEXT>"), endoftext=one("<|endoftext|>"),
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json, as the releases ship."""
    tokenizer.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # The class name every transformers version (4.x included) and LMDeploy resolve.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = list(ADDED_SPECIAL_TOKENS)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token,
        "pad_token": tokenizer.pad_token,
        "additional_special_tokens": list(ADDED_SPECIAL_TOKENS),
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def train_sentencepiece_model(vocab_size: int) -> bytes:
    """A BPE sentencepiece model with byte fallback, trained on the built-in corpus, the chat tokens
    appended as user-defined pieces; the serialized model (the bytes of tokenizer.model)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(CORPUS) * 4), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    model = sentencepiece_model_pb2.ModelProto.FromString(out.getvalue())
    for token in SENTENCEPIECE_CHAT_TOKENS:
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = token, 0.0, sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return model.SerializeToString()


def build_sentencepiece_tokenizer(folder: Path, vocab_size: int) -> Any:
    """Write tokenizer.model into `folder` and return the checkpoint's tokenizer class over it, with the
    chat tokens marked special and InternVL's tokens added (save it with save_sentencepiece_tokenizer)."""
    from transformers import AddedToken

    from ivl_tiny.tokenization_ivl_internlm2 import IVLInternLM2Tokenizer

    (folder / "tokenizer.model").write_bytes(train_sentencepiece_model(vocab_size))
    tokenizer = IVLInternLM2Tokenizer(vocab_file=str(folder / "tokenizer.model"), model_max_length=32768)
    tokenizer.add_special_tokens(
        {
            "additional_special_tokens": [
                AddedToken(t, special=True, normalized=False) for t in (*SENTENCEPIECE_CHAT_TOKENS, *SENTENCEPIECE_ADDED_TOKENS)
            ]
        }
    )
    return tokenizer


def save_sentencepiece_tokenizer(tokenizer: Any, folder: Path) -> None:
    """tokenizer.model, tokenization_ivl_internlm2.py and tokenizer_config.json with auto_map (copied and
    written by transformers' own custom-code saving), special_tokens_map.json."""
    type(tokenizer).register_for_auto_class("AutoTokenizer")
    tokenizer.save_pretrained(str(folder))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if "auto_map" not in config or not (folder / "tokenization_ivl_internlm2.py").exists():
        raise RuntimeError("transformers did not save the tokenizer's own class beside tokenizer.model")
    special_map = {
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "unk_token": tokenizer.unk_token,
        "pad_token": tokenizer.pad_token,
        "additional_special_tokens": [*SENTENCEPIECE_CHAT_TOKENS, *SENTENCEPIECE_ADDED_TOKENS],
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
