"""Conversation templates of the InternVL checkpoints, built the way the reference chat() builds them.

All InternVL chat templates use the reference's "MPT" separator style:
    system_template.format(system) + sep, then for every turn role + text + sep (a turn whose text is
    empty adds its role only), then the assistant role with no text (the generation prompt).
The reference stops generation only on the token `sep.strip()` (e.g. '<|im_end|>'), returns
`reply.split(sep)[0].strip()` and keeps that stripped text in the history; assistant turns are
stripped here so a client that sends back an unstripped reply still gets the reference's prompt.

Default system messages: each template's `system_message` is the one of the reference's
conversation.py since InternVL2 (one Chinese message for internlm2-chat, phi3-chat and Hermes-2);
`LEGACY_SYSTEM_MESSAGES` are the InternVL 1.5-era ones (see ivl_llm.system_messages for the choice
per checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ivl_proto.errors import invalid

INTERNLM2_SYSTEM_MESSAGE = "You are an AI assistant whose name is InternLM (书生·浦语)."
INTERNVL2_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
PHI3_SYSTEM_MESSAGE = "You are an AI assistant whose name is Phi-3."
HERMES2_SYSTEM_MESSAGE = "Answer the questions."
INTERNVL2_5_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

ROLE_SYSTEM = "system"
ROLE_USER = "user"
ROLE_ASSISTANT = "assistant"


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Template:
    name: str
    system_template: str
    system_message: str
    user_prefix: str
    assistant_prefix: str
    sep: str

    @property
    def stop_token(self) -> str:
        """The token the reference passes as eos_token_id: the separator without whitespace."""
        return self.sep.strip()


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        # InternVL-Chat-V1-5, Mini-InternVL-Chat-2B-V1-5, InternVL2-2B/8B/26B (InternLM2 LLMs).
        Template(
            name="internlm2-chat",
            system_template="<|im_start|>system\n{system_message}",
            system_message=INTERNVL2_SYSTEM_MESSAGE,
            user_prefix="<|im_start|>user\n",
            assistant_prefix="<|im_start|>assistant\n",
            sep="<|im_end|>",
        ),
        # Mini-InternVL-Chat-4B-V1-5, InternVL2-4B (Phi-3 LLM).
        Template(
            name="phi3-chat",
            system_template="<|system|>\n{system_message}",
            system_message=INTERNVL2_SYSTEM_MESSAGE,
            user_prefix="<|user|>\n",
            assistant_prefix="<|assistant|>\n",
            sep="<|end|>",
        ),
        # InternVL2-1B / 40B / 76B (Qwen2, Yi, Llama-3 LLMs with ChatML tokens).
        Template(
            name="Hermes-2",
            system_template="<|im_start|>system\n{system_message}",
            system_message=INTERNVL2_SYSTEM_MESSAGE,
            user_prefix="<|im_start|>user\n",
            assistant_prefix="<|im_start|>assistant\n",
            sep="<|im_end|>",
        ),
        # InternVL2.5 / InternVL3 (Qwen2.5, InternLM2.5 LLMs).
        Template(
            name="internvl2_5",
            system_template="<|im_start|>system\n{system_message}",
            system_message=INTERNVL2_5_SYSTEM_MESSAGE,
            user_prefix="<|im_start|>user\n",
            assistant_prefix="<|im_start|>assistant\n",
            sep="<|im_end|>\n",
        ),
    )
}


# The defaults of InternVL 1.5-era conversation.py (InternVL-Chat-V1-5, Mini-InternVL-Chat-2B/4B-V1-5,
# and the V1-2 Hermes-2 checkpoints), before InternVL2 replaced all three with INTERNVL2_SYSTEM_MESSAGE.
LEGACY_SYSTEM_MESSAGES: dict[str, str] = {
    "internlm2-chat": INTERNLM2_SYSTEM_MESSAGE,
    "phi3-chat": PHI3_SYSTEM_MESSAGE,
    "Hermes-2": HERMES2_SYSTEM_MESSAGE,
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted(TEMPLATES))
        raise invalid(f"conversation template {name!r} is not supported; known templates: {known}") from None


def check_conversation(messages: Sequence[ChatMessage]) -> None:
    """One optional system message first, then user/assistant turns ending with a user turn."""
    if not messages:
        raise invalid("the conversation is empty; send at least one user message")
    for index, message in enumerate(messages):
        if message.role not in (ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT):
            raise invalid(f"message {index} has role {message.role!r}; use system, user or assistant")
        if message.role == ROLE_SYSTEM and index != 0:
            raise invalid(f"message {index} is a system message; only the first message may be one")
        if message.role != ROLE_SYSTEM and not message.content:
            raise invalid(f"message {index} ({message.role}) is empty; send text or an <image> placeholder")
    if messages[-1].role != ROLE_USER:
        raise invalid(f"the last message must be a user message, got {messages[-1].role}")


def build_prompt(template: Template, messages: Sequence[ChatMessage], system_message: str | None = None) -> str:
    """The templated prompt text, '<image>' placeholders left in place, ending with the assistant role.

    The system text is the conversation's own system message if it has one, else `system_message`,
    else the template's default.
    """
    check_conversation(messages)
    turns = list(messages)
    system = template.system_message if system_message is None else system_message
    if turns[0].role == ROLE_SYSTEM:
        system = turns.pop(0).content
    parts = [template.system_template.format(system_message=system), template.sep]
    for message in turns:
        if message.role == ROLE_USER:
            parts += [template.user_prefix, message.content, template.sep]
            continue
        reply = message.content.strip()  # the reference keeps response.strip() in its history
        parts += [template.assistant_prefix, reply, template.sep] if reply else [template.assistant_prefix]
    parts.append(template.assistant_prefix)
    return "".join(parts)


def image_placeholders(count: int) -> str:
    """The text the reference puts before a question for `count` images of one turn:
    '<image>\\n' for one image, 'Image-1: <image>\\nImage-2: <image>\\n...' for several."""
    if count <= 0:
        return ""
    if count == 1:
        return "<image>\n"
    return "".join(f"Image-{i}: <image>\n" for i in range(1, count + 1))
