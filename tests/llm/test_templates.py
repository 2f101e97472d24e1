"""Prompt text exactly as the reference chat() builds it, for every supported template."""

from __future__ import annotations

import pytest
from ivl_llm.templates import (
    INTERNVL2_5_SYSTEM_MESSAGE,
    INTERNVL2_SYSTEM_MESSAGE,
    LEGACY_SYSTEM_MESSAGES,
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
        f"<|im_start|>system\n{INTERNVL2_SYSTEM_MESSAGE}<|im_end|>"
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
        f"<|system|>\n{INTERNVL2_SYSTEM_MESSAGE}<|end|>"
        "<|user|>\nhi<|end|><|assistant|>\n"
    )
    assert get_template("phi3-chat").stop_token == "<|end|>"


@pytest.mark.parametrize("name", ["internlm2-chat", "phi3-chat", "Hermes-2"])
def test_internvl2_default_system_message_is_one_chinese_message(name):
    """The reference's conversation.py since InternVL2 (2024-07): one default for all three templates."""
    assert get_template(name).system_message == (
        "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
    )


def test_internvl1_5_era_default_system_messages():
    assert LEGACY_SYSTEM_MESSAGES == {
        "internlm2-chat": "You are an AI assistant whose name is InternLM (书生·浦语).",
        "phi3-chat": "You are an AI assistant whose name is Phi-3.",
        "Hermes-2": "Answer the questions.",
    }
    prompt = build_prompt(get_template("Hermes-2"), [ChatMessage(USER, "hi")], LEGACY_SYSTEM_MESSAGES["Hermes-2"])
    assert prompt.startswith("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nhi")


def test_assistant_turns_are_stripped_as_the_reference_keeps_them():
    """chat() keeps response.strip() in its history; a client that sends back the raw reply gets the same prompt."""
    template = get_template("internvl2_5")
    raw = [ChatMessage(USER, "hi"), ChatMessage(ASSISTANT, "\n A cat. \n"), ChatMessage(USER, "More?")]
    clean = [ChatMessage(USER, "hi"), ChatMessage(ASSISTANT, "A cat."), ChatMessage(USER, "More?")]
    assert build_prompt(template, raw) == build_prompt(template, clean)
    assert "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nMore?" in build_prompt(template, raw)


def test_whitespace_only_assistant_turn_adds_its_role_only_as_the_mpt_style_does():
    template = get_template("internlm2-chat")
    prompt = build_prompt(template, [ChatMessage(USER, "a"), ChatMessage(ASSISTANT, "  "), ChatMessage(USER, "b")])
    assert "<|im_start|>user\na<|im_end|><|im_start|>assistant\n<|im_start|>user\nb<|im_end|>" in prompt


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
