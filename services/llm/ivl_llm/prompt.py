"""From a conversation + one embedding per '<image>' to token ids and embedding ranges, with the checks.

Each '<image>' placeholder becomes '<img>' + '<IMG_CONTEXT>' x rows + '</img>' (rows = the rows of its
embedding, i.e. tiles x 256), and the expanded text is tokenized the way the reference does it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ivl_proto.errors import invalid
from ivl_proto.image_placeholder import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    count_placeholders,
    expand_placeholders,
)

from ivl_llm.templates import ChatMessage, Template, build_prompt


@dataclass(frozen=True)
class ImageEmbedding:
    """One image's visual embedding: rows x hidden; bfloat16 travels as its uint16 bit pattern."""

    array: np.ndarray
    dtype: str  # "float32" | "float16" | "bfloat16"

    @property
    def rows(self) -> int:
        return int(self.array.shape[0])


@dataclass(frozen=True)
class PreparedPrompt:
    text: str  # the templated prompt with placeholders still unexpanded
    input_ids: list[int]
    embeddings: list[ImageEmbedding]
    embedding_ranges: list[tuple[int, int]]  # [start, end) of each image's '<IMG_CONTEXT>' run
    max_new_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


def context_runs(input_ids: Sequence[int], context_id: int) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of `context_id` in `input_ids`."""
    ids = np.asarray(input_ids)
    is_ctx = np.concatenate([[False], ids == context_id, [False]])
    edges = np.flatnonzero(is_ctx[1:] != is_ctx[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[0::2], edges[1::2], strict=True)]


class PromptBuilder:
    """Holds what prompt building needs from the model: tokenizer, template and limits."""

    def __init__(
        self,
        tokenizer: Any,
        template: Template,
        hidden_size: int,
        context_length: int,
        system_message: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.hidden_size = hidden_size
        self.context_length = context_length
        self.system_message = system_message
        self.context_id = self._single_token_id(IMG_CONTEXT_TOKEN)

    def _single_token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise invalid(f"the checkpoint's tokenizer has no {token!r} token; is this an InternVL checkpoint?")
        return int(token_id)

    def check_embeddings(self, text: str, embeddings: Sequence[ImageEmbedding]) -> None:
        placeholders = count_placeholders(text)
        if placeholders != len(embeddings):
            raise invalid(
                f"the conversation holds {placeholders} '<image>' placeholder(s) but {len(embeddings)} "
                "image embedding(s) were sent; send one embedding per placeholder, in order"
            )
        for index, emb in enumerate(embeddings):
            if emb.array.ndim != 2:
                raise invalid(
                    f"image embedding {index} has shape {list(emb.array.shape)}; expected 2 dimensions "
                    f"(tiles*256 x {self.hidden_size})"
                )
            if emb.array.shape[1] != self.hidden_size:
                raise invalid(
                    f"image embedding {index} is {emb.array.shape[1]} wide but the LLM's hidden size is "
                    f"{self.hidden_size}; were these embeddings made by the matching vision encoder?"
                )
            if emb.rows == 0:
                raise invalid(f"image embedding {index} has no rows")

    def prepare(
        self,
        messages: Sequence[ChatMessage],
        embeddings: Sequence[ImageEmbedding],
        max_new_tokens: int | None,
        default_max_new_tokens: int = 512,
    ) -> PreparedPrompt:
        """max_new_tokens None: the default, shortened to what the context length leaves."""
        text = build_prompt(self.template, messages, self.system_message)
        self.check_embeddings(text, embeddings)
        expanded = expand_placeholders(text, [e.rows for e in embeddings])
        input_ids = [int(i) for i in self.tokenizer(expanded, add_special_tokens=True)["input_ids"]]
        if max_new_tokens is None:
            max_new_tokens = max(1, min(default_max_new_tokens, self.context_length - len(input_ids)))
        total = len(input_ids) + max_new_tokens
        if total > self.context_length:
            raise invalid(
                f"the prompt is {len(input_ids)} tokens and max_new_tokens (OpenAI max_tokens) is {max_new_tokens}: "
                f"{total} > the context length {self.context_length}; send fewer or smaller images, "
                "a shorter conversation or a smaller max_new_tokens"
            )
        ranges = context_runs(input_ids, self.context_id)
        lengths = [b - a for a, b in ranges]
        if lengths != [e.rows for e in embeddings]:
            raise invalid(
                f"the prompt text itself contains '{IMG_CONTEXT_TOKEN}', '{IMG_START_TOKEN}' or "
                f"'{IMG_END_TOKEN}' (image token runs {lengths}, embeddings {[e.rows for e in embeddings]}); "
                "remove them from the messages"
            )
        return PreparedPrompt(text, input_ids, list(embeddings), ranges, max_new_tokens)
