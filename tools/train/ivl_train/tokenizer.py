"""The demo model's tokenizer: byte-level BPE that spells lowercase letters, digits and CJK characters
one token each, with the same special tokens as ivl_tiny's (and the real releases').

Any string round-trips (byte level). Lowercase letters, digits and CJK characters are split off one by
one before BPE, so a printed word is spelled a character per token and the model never has to learn
which letter pairs the vocabulary happened to merge. BPE merges only the other runs (capitalised words,
punctuation, the bytes of each CJK character) from a corpus of the prompts the stack sends. The words of
the chat template and of the fixed questions are whole-word tokens (as in any real vocabulary), which
keeps prompts short: prompt tokens cost as much training time as image tokens here.
"""

from __future__ import annotations

from ivl_llm.templates import (
    INTERNLM2_SYSTEM_MESSAGE,
    INTERNVL2_5_SYSTEM_MESSAGE,
    INTERNVL2_SYSTEM_MESSAGE,
    TEMPLATES,
)
from ivl_tiny.tokenizer import ADDED_SPECIAL_TOKENS, BASE_SPECIAL_TOKENS
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ivl_train.synth import CHINESE_WORDS, COLORS, QUESTIONS

ONE_TOKEN_EACH = r"[a-z0-9]|[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3000-\u303f\uff00-\uffef]"
MERGES_TARGET = 1024  # vocabulary size BPE may grow to (the corpus is small; it stops earlier)
PAD_TOKEN = "<|endoftext|>"  # Qwen2's pad/bos, as ivl_tiny writes Qwen2 checkpoints
# Whole words (matched only as whole words): the roles, the questions, common system-message words.
WORD_TOKENS = (
    "system", "user", "assistant", "What", "is", "written", "in", "the", "image", "color", "shape", "Image",
    "You", "are", "an", "AI", "whose", "name", "InternLM", "InternVL", "Answer", "questions", "a", "helpful",
    "Read", "carefully",
)


def corpus() -> list[str]:
    texts = [INTERNLM2_SYSTEM_MESSAGE, INTERNVL2_SYSTEM_MESSAGE, INTERNVL2_5_SYSTEM_MESSAGE]
    texts += [t.system_message for t in TEMPLATES.values()]
    texts += [t.system_template + t.user_prefix + t.assistant_prefix for t in TEMPLATES.values()]
    texts += list(QUESTIONS.values()) + list(COLORS) + list(CHINESE_WORDS)
    texts += [f"Image-{i}: <image>\n" for i in range(1, 10)]
    texts += ["Answer the questions.", "You are a helpful assistant.", "Read the image carefully."]
    return texts


def build_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(ONE_TOKEN_EACH), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MERGES_TARGET,
        special_tokens=list(BASE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus() * 2, trainer=trainer)
    core.add_tokens([AddedToken(word, single_word=True, normalized=False) for word in WORD_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ADDED_SPECIAL_TOKENS),
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
