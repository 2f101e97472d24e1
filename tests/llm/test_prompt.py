"""Placeholder expansion, token ids, embedding ranges and the INVALID_ARGUMENT checks (real tiny tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest
from ivl_llm.prompt import ImageEmbedding, PromptBuilder, context_runs
from ivl_llm.templates import ChatMessage, build_prompt, get_template
from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.image_placeholder import IMG_CONTEXT_TOKEN, expand_placeholders

HIDDEN = 64


def emb(rows: int, width: int = HIDDEN) -> ImageEmbedding:
    return ImageEmbedding(np.zeros((rows, width), dtype=np.float32), "float32")


@pytest.fixture
def builder(internlm2_tokenizer) -> PromptBuilder:
    return PromptBuilder(internlm2_tokenizer, get_template("internlm2-chat"), HIDDEN, context_length=2048)


def test_expand_placeholders_uses_each_embeddings_rows():
    text = expand_placeholders("Image-1: <image>\nImage-2: <image>\nq", [2, 3])
    assert text == (
        "Image-1: <img><IMG_CONTEXT><IMG_CONTEXT></img>\n"
        "Image-2: <img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\nq"
    )


def test_context_runs_finds_every_run():
    assert context_runs([5, 9, 9, 5, 9, 5], 9) == [(1, 3), (4, 5)]
    assert context_runs([5, 5], 9) == []


def test_prepare_matches_tokenizing_the_reference_query(builder, internlm2_tokenizer):
    messages = [
        ChatMessage("user", "Image-1: <image>\nImage-2: <image>\nCompare."),
        ChatMessage("assistant", "Both are cats."),
        ChatMessage("user", "<image>\nAnd this one?"),
    ]
    embeddings = [emb(256), emb(512), emb(256)]
    prompt = builder.prepare(messages, embeddings, max_new_tokens=8)
    # The reference: template text, each '<image>' replaced in order, then tokenizer(query).
    query = build_prompt(get_template("internlm2-chat"), messages)
    for rows in (256, 512, 256):
        query = query.replace("<image>", "<img>" + IMG_CONTEXT_TOKEN * rows + "</img>", 1)
    assert prompt.input_ids == internlm2_tokenizer(query)["input_ids"]
    context_id = internlm2_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert [b - a for a, b in prompt.embedding_ranges] == [256, 512, 256]
    for start, end in prompt.embedding_ranges:
        assert set(prompt.input_ids[start:end]) == {context_id}
        assert prompt.input_ids[start - 1] == internlm2_tokenizer.convert_tokens_to_ids("<img>")
        assert prompt.input_ids[end] == internlm2_tokenizer.convert_tokens_to_ids("</img>")
    assert prompt.prompt_tokens == len(prompt.input_ids)


def test_placeholder_count_mismatch_is_invalid_argument(builder):
    with pytest.raises(ServingError) as caught:
        builder.prepare([ChatMessage("user", "<image>\n<image>\nhi")], [emb(256)], 8)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert "2 '<image>' placeholder(s) but 1 image embedding(s)" in caught.value.message


def test_embedding_width_mismatch_names_both_sizes(builder):
    with pytest.raises(ServingError) as caught:
        builder.prepare([ChatMessage("user", "<image>\nhi")], [emb(256, width=2048)], 8)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert "2048 wide" in caught.value.message and "hidden size is 64" in caught.value.message


def test_embedding_must_be_two_dimensional(builder):
    bad = ImageEmbedding(np.zeros((1, 256, HIDDEN), dtype=np.float32), "float32")
    with pytest.raises(ServingError, match=r"shape \[1, 256, 64\]"):
        builder.prepare([ChatMessage("user", "<image>\nhi")], [bad], 8)


def test_context_length_overflow_says_the_numbers(internlm2_tokenizer):
    small = PromptBuilder(internlm2_tokenizer, get_template("internlm2-chat"), HIDDEN, context_length=300)
    with pytest.raises(ServingError) as caught:
        small.prepare([ChatMessage("user", "<image>\nhi")], [emb(256)], max_new_tokens=100)
    message = caught.value.message
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    prompt_tokens = int(message.split("the prompt is ")[1].split(" ")[0])
    assert prompt_tokens > 256
    assert f"{prompt_tokens + 100} > the context length 300" in message


def test_unset_max_new_tokens_fits_the_context(internlm2_tokenizer):
    small = PromptBuilder(internlm2_tokenizer, get_template("internlm2-chat"), HIDDEN, context_length=400)
    prompt = small.prepare([ChatMessage("user", "<image>\nhi")], [emb(256)], None, default_max_new_tokens=512)
    assert prompt.max_new_tokens == 400 - prompt.prompt_tokens


def test_literal_image_tokens_in_user_text_are_rejected(builder):
    with pytest.raises(ServingError, match="remove them"):
        builder.prepare([ChatMessage("user", "<image>\nhi <IMG_CONTEXT>")], [emb(4)], 8)
