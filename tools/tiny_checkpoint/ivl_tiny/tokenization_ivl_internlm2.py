"""The tokenizer class of ivl_tiny's InternLM2-style checkpoints, copied beside their `tokenizer.model`.

Like the real InternLM2 releases, the checkpoint names this file in tokenizer_config.json's `auto_map`,
so it loads only with trust_remote_code: a sentencepiece BPE model with byte fallback (multi-byte
characters split over byte pieces), BOS prepended to every encoded text, the chat tokens
('<|im_end|>', '<|im_start|>') as user-defined symbols of the sentencepiece model, and InternVL's image
tokens added after its vocabulary. Built on transformers' SentencePieceBackend; only what InternLM2's
tokenizer does differently is here. Self-contained: it imports transformers only.
"""

from __future__ import annotations

from typing import Any

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend


class IVLInternLM2Tokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}  # noqa: RUF012 (transformers' class attributes)
    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "</s>",
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        **kwargs: Any,
    ) -> None:
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(
            vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
            pad_token=pad_token, add_bos_token=add_bos_token, add_eos_token=add_eos_token, **kwargs,
        )

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + token_ids_0 + eos
        return out if token_ids_1 is None else out + bos + token_ids_1 + eos

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos, eos = [1] * self.add_bos_token, [1] * self.add_eos_token
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return (int(self.add_bos_token) + int(self.add_eos_token)) * (2 if pair else 1)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Pieces -> text through sentencepiece itself, so byte-fallback pieces become their characters
        (an incomplete character decodes to U+FFFD) and the word-boundary marks become spaces."""
        return self.sp_model.decode_pieces(list(tokens))
