"""Generation stops where the reference chat() stops: on the template separator's token only
(eos_token_id = tokenizer.convert_tokens_to_ids(template.sep)); eos only when the tokenizer lacks it."""

from __future__ import annotations

from ivl_llm.service import LLMService
from support.llm_server import server_settings


def test_only_the_separator_token_stops(tiny_original, tiny_qwen2_original):
    internlm2 = LLMService(server_settings(tiny_original, warmup=False))
    im_end = internlm2.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert internlm2.tokenizer.eos_token_id != im_end  # '</s>' is not a stop token for the reference
    assert internlm2.stop_token_ids == {im_end}
    qwen2 = LLMService(server_settings(tiny_qwen2_original, warmup=False))
    assert qwen2.stop_token_ids == {qwen2.tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_a_tokenizer_without_the_separator_token_stops_on_eos(tiny_original):
    service = LLMService(server_settings(tiny_original, warmup=False, template="phi3-chat"))  # '<|end|>' unknown
    assert service.stop_token_ids == {service.tokenizer.eos_token_id}
