"""Training sequences built by the LLM service's own prompt code, so the model learns what the stack sends.

The conversation goes through ivl_llm.templates.build_prompt (the checkpoint's template, the system
message), the '<image>' placeholders through ivl_llm.prompt.expand_placeholders ('<img>' +
'<IMG_CONTEXT>' x rows + '</img>') and the placeholders themselves are written the way the gateway
writes them ('<image>\\n' for one image, 'Image-K: <image>\\n' for several). The loss covers each
assistant reply and its end-of-turn token.

The system message is drawn per sample, so the model reads whatever default the serving side applies:
the template's own, InternVL2's Chinese one, InternLM2's (1.5 era), a short custom one, an empty one, or
no system block at all.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from ivl_llm.prompt import expand_placeholders
from ivl_llm.templates import (
    INTERNLM2_SYSTEM_MESSAGE,
    INTERNVL2_SYSTEM_MESSAGE,
    ChatMessage,
    Template,
    build_prompt,
    image_placeholders,
)
from transformers import PreTrainedTokenizerFast

IGNORE = -100
TEMPLATE_DEFAULT = None  # build_prompt's "use the template's default"
NO_SYSTEM_BLOCK = "<no system block>"
CUSTOM_SYSTEM_MESSAGES = ("Answer the questions.", "You are a helpful assistant.", "Read the image carefully.")
SYSTEM_CHOICES: tuple[tuple[str | None, float], ...] = (
    (TEMPLATE_DEFAULT, 0.3),
    (INTERNVL2_SYSTEM_MESSAGE, 0.25),
    (INTERNLM2_SYSTEM_MESSAGE, 0.1),
    ("custom", 0.15),
    ("", 0.1),
    (NO_SYSTEM_BLOCK, 0.1),
)


def draw_system(rng: random.Random) -> str | None:
    """A system message (None = the template default, NO_SYSTEM_BLOCK = none at all)."""
    choice = rng.choices([c for c, _ in SYSTEM_CHOICES], weights=[w for _, w in SYSTEM_CHOICES])[0]
    return rng.choice(CUSTOM_SYSTEM_MESSAGES) if choice == "custom" else choice


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str
    images: int  # images attached to this user turn (0 or 1 here)


@dataclass(frozen=True)
class TrainingSequence:
    input_ids: list[int]
    labels: list[int]
    text: str  # the templated prompt, placeholders unexpanded (for logs and tests)


def user_texts(turns: Sequence[Turn]) -> list[str]:
    """Each user message's text with its placeholders, numbered over the conversation as the gateway does."""
    total = sum(t.images for t in turns)
    out, counter = [], 0
    for turn in turns:
        prefix = ""
        for _ in range(turn.images):
            counter += 1
            prefix += image_placeholders(1) if total == 1 else f"Image-{counter}: <image>\n"
        out.append(prefix + turn.question)
    return out


def _prompt(template: Template, messages: list[ChatMessage], system: str | None) -> str:
    if system == NO_SYSTEM_BLOCK:
        text = build_prompt(template, messages, "")
        head = template.system_template.format(system_message="") + template.sep
        return text[len(head) :]
    return build_prompt(template, messages, system)


def build_sequence(
    tokenizer: PreTrainedTokenizerFast,
    template: Template,
    turns: Sequence[Turn],
    image_rows: Sequence[int],
    system: str | None,
) -> TrainingSequence:
    """Token ids and labels of a conversation whose every assistant reply is learned.

    image_rows: '<IMG_CONTEXT>' rows of each image in order (tiles x tokens per tile).
    """
    stop_id = tokenizer.convert_tokens_to_ids(template.stop_token)
    questions = user_texts(turns)
    messages: list[ChatMessage] = []
    input_ids: list[int] = []
    labels: list[int] = []
    text = ""
    for question, turn in zip(questions, turns, strict=True):
        messages.append(ChatMessage("user", question))
        text = _prompt(template, messages, system)  # ends with the assistant role
        prompt_ids = _ids(tokenizer, text, image_rows)
        if prompt_ids[: len(input_ids)] != input_ids:
            raise AssertionError("the templated history does not tokenize to a prefix of the next turn's prompt")
        labels += [IGNORE] * (len(prompt_ids) - len(input_ids))
        answer_ids = _ids(tokenizer, turn.answer, [])
        input_ids = prompt_ids + answer_ids + [stop_id]
        labels += [*answer_ids, stop_id]
        messages.append(ChatMessage("assistant", turn.answer))
    full = _prompt(template, messages[:-1], system) + turns[-1].answer + template.sep
    check = _ids(tokenizer, full, image_rows)
    if check[: len(input_ids)] != input_ids:
        raise AssertionError("prompt + reply tokenize differently joined than apart; the labels would be off")
    return TrainingSequence(input_ids, labels, text)


def _ids(tokenizer: PreTrainedTokenizerFast, text: str, image_rows: Sequence[int]) -> list[int]:
    rows = list(image_rows)[: text.count("<image>")]
    return [int(i) for i in tokenizer(expand_placeholders(text, rows), add_special_tokens=True)["input_ids"]]
