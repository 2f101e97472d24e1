"""Prompt text exactly as the reference chat() builds it, for every supported template."""

from __future__ import annotations

import pytest
from ivl_llm.templates import (
    INTERNLM2_SYSTEM_MESSAGE,
    INTERNVL2_5_SYSTEM_MESSAGE,
    ChatMessage,
    build_prompt,
    get_template,
    image_placeholders,
)
from ivl_proto.errors import ErrorCode, ServingError

USER = "user"
ASSISTANT = "assistant"


def test_internlm2_chat_single_turn_matches_reference_layout():
    prompt = build_prompt(get_template("internlm2-chat"), [ChatMessage(USER, "<image>\nWhat is this?")])
    assert prompt == (
        f"<|im_start|>system\n{INTERNLM2_SYSTEM_MESSAGE}<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>"
        "<|im_start|>assistant\n"
    )


def test_internlm2_chat_second_turn_keeps_history_unexpanded():
    messages = [
        ChatMessage(USER, "<image>\nWhat is this?"),
        ChatMessage(ASSISTANT, "A cat."),
        ChatMessage(USER, "What colour?"),
    ]
    prompt = build_prompt(get_template("internlm2-chat"), messages)
    assert prompt.endswith(
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|>"
        "<|im_start|>user\nWhat colour?<|im_end|><|im_start|>assistant\n"
    )


def test_internvl2_5_separator_has_newline_and_chinese_system_message():
    prompt = build_prompt(get_template("internvl2_5"), [ChatMessage(USER, "hi")])
    assert prompt == (
        f"<|im_start|>system\n{INTERNVL2_5_SYSTEM_MESSAGE}<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert get_template("internvl2_5").stop_token == "<|im_end|>"


def test_phi3_chat_uses_its_own_tokens():
    prompt = build_prompt(get_template("phi3-chat"), [ChatMessage(USER, "hi")])
    assert prompt == (
        "<|system|>\nYou are an AI assistant whose name is Phi-3.<|end|>"
        "<|user|>\nhi<|end|><|assistant|>\n"
    )
    assert get_template("phi3-chat").stop_token == "<|end|>"


def test_hermes_2_default_system_message():
    prompt = build_prompt(get_template("Hermes-2"), [ChatMessage(USER, "hi")])
    assert prompt.startswith("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nhi")


def test_system_message_precedence():
    template = get_template("internlm2-chat")
    own = build_prompt(template, [ChatMessage("system", "Be brief."), ChatMessage(USER, "hi")], "ignored")
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    override = build_prompt(template, [ChatMessage(USER, "hi")], "From the checkpoint.")
    assert override.startswith("<|im_start|>system\nFrom the checkpoint.<|im_end|>")


def test_image_placeholders_follow_the_reference_multi_image_form():
    assert image_placeholders(0) == ""
    assert image_placeholders(1) == "<image>\n"
    assert image_placeholders(2) == "Image-1: <image>\nImage-2: <image>\n"


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([], "empty"),
        ([ChatMessage(USER, "a"), ChatMessage(ASSISTANT, "b")], "last message must be a user message"),
        ([ChatMessage(USER, "a"), ChatMessage("system", "s"), ChatMessage(USER, "c")], "only the first"),
        ([ChatMessage("robot", "a")], "role 'robot'"),
        ([ChatMessage(USER, "")], "is empty"),
    ],
)
def test_bad_conversations_are_invalid_argument(messages, needle):
    with pytest.raises(ServingError) as caught:
        build_prompt(get_template("internlm2-chat"), messages)
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert needle in caught.value.message


def test_unknown_template_names_the_known_ones():
    with pytest.raises(ServingError, match="internlm2-chat"):
        get_template("vicuna")
