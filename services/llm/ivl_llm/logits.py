"""The per-step logits pipeline of the transformers backend: penalties and biases, then (after the grammar
mask) the sampling warpers. transformers' own logits processors where they exist; the OpenAI presence /
frequency penalty (which transformers does not have) is ours.

Order (as vLLM applies them): logit_bias, min_tokens (stop tokens suppressed), repetition penalty (prompt +
output, multiplicative, transformers' semantics), presence/frequency penalty (output only, OpenAI's);
then the grammar mask; then temperature, top_k, top_p. Logprobs are taken from the raw distribution before
any of this (vLLM's default `raw_logprobs`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch

from ivl_llm.sampling import Sampling


class PresenceFrequencyPenalty:
    """OpenAI's penalties over the tokens generated so far: logit -= frequency * count + presence * (count > 0)."""

    def __init__(self, presence: float, frequency: float, prompt_length: int) -> None:
        self.presence = presence
        self.frequency = frequency
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length:]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


@dataclass(frozen=True)
class LogitsPipeline:
    penalties: Any  # transformers LogitsProcessorList, before the grammar mask
    warpers: Any  # after it

    @property
    def empty(self) -> bool:
        return not self.penalties and not self.warpers


def build_pipeline(
    sampling: Sampling, prompt_length: int, stop_token_ids: Collection[int], device: str = "cpu"
) -> LogitsPipeline:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    penalties = LogitsProcessorList()
    if sampling.logit_bias:
        penalties.append(SequenceBiasLogitsProcessor([[[token_id], bias] for token_id, bias in sampling.logit_bias]))
    if sampling.min_new_tokens > 0 and stop_token_ids:
        penalties.append(MinNewTokensLengthLogitsProcessor(prompt_length, sampling.min_new_tokens,
                                                           sorted(int(i) for i in stop_token_ids), device=device))
    if sampling.repetition_penalty != 1.0:
        penalties.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if sampling.presence_penalty or sampling.frequency_penalty:
        penalties.append(PresenceFrequencyPenalty(sampling.presence_penalty, sampling.frequency_penalty, prompt_length))
    warpers = LogitsProcessorList()
    if not sampling.greedy:
        if sampling.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k > 0:
            warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            warpers.append(TopPLogitsWarper(sampling.top_p))
    return LogitsPipeline(penalties, warpers)
