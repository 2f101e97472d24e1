"""ivl_train's data: the tokenizer spells, the synthetic kinds, training sequences equal what the LLM service
sends for the same conversation, and the auxiliary per-token targets land where the tiler puts the text."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest
from ivl_llm.prompt import ImageEmbedding, PromptBuilder
from ivl_llm.templates import INTERNVL2_SYSTEM_MESSAGE, ChatMessage, get_template, image_placeholders
from ivl_train.aux_targets import CHAR_INDEX, aux_targets
from ivl_train.data import DataConfig, ExampleMaker
from ivl_train.fonts import check_fonts
from ivl_train.model import TEMPLATE
from ivl_train.prompts import IGNORE, NO_SYSTEM_BLOCK, Turn, build_sequence
from ivl_train.synth import CHINESE_WORDS, COLORS, KINDS, QUESTIONS, CharBox, make_sample
from ivl_train.tokenizer import build_tokenizer
from ivl_vision.tiling import TilingConfig, plan_tiles

TOKENS_PER_TILE = 64


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_fonts_are_installed():
    check_fonts()  # DejaVu, Liberation and WenQuanYi Micro Hei (scripts/setup_env.sh installs them)


def test_tokenizer_spells_letters_digits_and_cjk_one_token_each(tokenizer):
    for text in ("qzxkv", "90417", "北京", "熊猫"):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        assert len(ids) == len(text)
        assert tokenizer.decode(ids) == text
    for text in ("What is written in the image?", "图中写的是什么？", "naïve Ω 😀 mixed ABC"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    for token in ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<|endoftext|>"):
        assert len(tokenizer(token)["input_ids"]) == 1


def test_tokenizer_is_deterministic(tokenizer):
    again = build_tokenizer()
    assert again.get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize("kind", KINDS)
def test_samples_of_each_kind(kind):
    rng = random.Random(3)
    for _ in range(5):
        sample = make_sample(kind, rng)
        assert sample.question == QUESTIONS[kind]
        assert min(sample.image.size) >= 448 and max(sample.image.size) <= 1800
        if kind in ("text", "small"):
            assert 3 <= len(sample.answer) <= 8 and set(sample.answer) <= set(string.ascii_lowercase)
        elif kind == "number":
            assert 2 <= len(sample.answer) <= 6 and sample.answer.isdigit() and sample.answer[0] != "0"
        elif kind == "color":
            assert sample.answer in COLORS
        else:
            assert sample.answer in CHINESE_WORDS
        if kind != "color":
            assert "".join(box.char for box in sample.chars) == sample.answer
        # the image is not blank: the text / shape was drawn
        assert len(sample.image.getcolors(maxcolors=1_000_000) or []) > 1


def test_small_text_is_small_in_the_overview_and_readable_in_the_tiles():
    rng = random.Random(5)
    for _ in range(10):
        sample = make_sample("small", rng, small_size=(1600, 1200))
        assert sample.image.size == (1600, 1200)
        plan = plan_tiles(1600, 1200, TilingConfig(max_tiles=12))
        assert (plan.grid_cols, plan.grid_rows, plan.num_tiles) == (4, 3, 13)
        height = sample.chars[0].height
        assert height * 448 / 1200 < 16 <= height * plan.resize_height / 1200


@pytest.mark.parametrize("system", [None, INTERNVL2_SYSTEM_MESSAGE, "Answer the questions.", "", NO_SYSTEM_BLOCK])
def test_training_sequence_is_what_the_llm_service_sends(tokenizer, system):
    template = get_template(TEMPLATE)
    rows = 5 * TOKENS_PER_TILE
    sequence = build_sequence(tokenizer, template, [Turn("What is written in the image?", "kqzv", 1)], [rows], system)
    if system != NO_SYSTEM_BLOCK:
        builder = PromptBuilder(tokenizer, template, 192, 4096, system)
        served = builder.prepare(
            [ChatMessage("user", image_placeholders(1) + "What is written in the image?")],
            [ImageEmbedding(np.zeros((rows, 192), np.float32), "float32")], 8,
        )
        assert sequence.input_ids[: len(served.input_ids)] == served.input_ids
        prompt_len = len(served.input_ids)
    else:
        assert "system" not in sequence.text
        prompt_len = sequence.labels.index(next(x for x in sequence.labels if x != IGNORE))
    answer = sequence.input_ids[prompt_len:]
    assert tokenizer.decode(answer) == "kqzv<|im_end|>"
    assert sequence.labels[:prompt_len] == [IGNORE] * prompt_len
    assert sequence.labels[prompt_len:] == answer


def test_two_turn_sequences_learn_both_replies_with_the_gateways_image_numbering(tokenizer):
    template = get_template(TEMPLATE)
    turns = [Turn("What color is the shape?", "red", 1), Turn("What is written in the image?", "abc", 1)]
    sequence = build_sequence(tokenizer, template, turns, [64, 128], None)
    assert "Image-1: <image>\nWhat color" in sequence.text and "Image-2: <image>\nWhat is written" in sequence.text
    learned = tokenizer.decode([i for i, label in zip(sequence.input_ids, sequence.labels, strict=True) if label != IGNORE])
    assert learned == "red<|im_end|>abc<|im_end|>"


def test_examples_use_the_vision_services_preprocessing(tokenizer):
    maker = ExampleMaker(tokenizer, get_template(TEMPLATE), TOKENS_PER_TILE, DataConfig(seed=1))
    for index in range(6):
        example = maker.training_example(index)
        image_tokens = sum(1 for i in example.input_ids if i == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"))
        assert image_tokens == example.tiles * TOKENS_PER_TILE
        assert example.pixel_values.shape[1:] == (3, 448, 448)
    again = ExampleMaker(tokenizer, get_template(TEMPLATE), TOKENS_PER_TILE, DataConfig(seed=1))
    assert again.training_example(4).input_ids == maker.training_example(4).input_ids  # seeded per index


def test_aux_targets_follow_the_tiling():
    plan = plan_tiles(1600, 1200, TilingConfig(max_tiles=12))  # 4x3 grid at 1.12x + thumbnail
    boxes = [CharBox("a", 500.0, 700.0, 30.0), CharBox("7", 1590.0, 10.0, 30.0)]
    targets = aux_targets(boxes, plan)
    # 'a': x 560, y 784 in the 1792x1344 grid -> tile (1, 1) = 5, patch (4, 12) of its 16x16 28 px patches
    assert (5, 12 * 16 + 4, CHAR_INDEX["a"]) in targets.positives
    assert (3, 0 * 16 + 15, CHAR_INDEX["7"]) in targets.positives
    assert targets.ignored_tiles == (12,)  # the thumbnail: 11 px high text is not asked for
    single = aux_targets([CharBox("b", 800.0, 600.0, 200.0)], plan_tiles(1600, 1200, TilingConfig(max_tiles=1)))
    assert single.positives == ((0, 8 * 16 + 8, CHAR_INDEX["b"]),) and not single.ignored_tiles


def test_the_ui_example_pictures_are_the_ones_ivl_train_draws(tmp_path):
    """frontend/ivl_frontend/examples holds exactly `python -m ivl_train examples`' pictures, with the same
    questions the chat offers."""
    from ivl_frontend.chat_examples import EXAMPLES as UI_EXAMPLES
    from ivl_frontend.chat_examples import EXAMPLES_DIR
    from ivl_train.examples import EXAMPLES, write_examples

    assert [(e.file_name, e.question) for e in EXAMPLES] == list(UI_EXAMPLES)
    for path in write_examples(tmp_path):
        assert path.read_bytes() == (EXAMPLES_DIR / path.name).read_bytes(), path.name
    assert sorted(p.name for p in EXAMPLES_DIR.iterdir()) == sorted(e.file_name for e in EXAMPLES)
