"""The real InternLM2 tokenizer path: a sentencepiece `tokenizer.model` behind the checkpoint's own tokenizer
class (auto_map, trust_remote_code), BOS added, chat tokens as user-defined symbols, byte fallback for
characters outside the vocabulary; loaded and served by the LLM service."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from ivl_llm.decoding import IncrementalDetokenizer
from ivl_llm.prompt import ImageEmbedding
from ivl_llm.service import LLMService
from ivl_llm.templates import ChatMessage
from ivl_proto.common.v1 import common_pb2
from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.llm.v1 import llm_pb2, llm_pb2_grpc
from ivl_proto.tensor_codec import tensor_to_pb
from sentencepiece import SentencePieceProcessor
from support.llm_server import running_llm_server, server_settings

TEXT = "书生·浦语 says 你好世界, then 🙂 hello"


@pytest.fixture(scope="module")
def service(tiny_internlm2_sentencepiece) -> LLMService:
    return LLMService(server_settings(tiny_internlm2_sentencepiece, trust_remote_code=True, warmup=False))


def test_the_checkpoint_ships_its_tokenizer_like_the_releases(tiny_internlm2_sentencepiece):
    folder = tiny_internlm2_sentencepiece
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_ivl_internlm2.IVLInternLM2Tokenizer"
    assert (folder / "tokenization_ivl_internlm2.py").is_file() and not (folder / "tokenizer.json").exists()
    sp = SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    last = sp.get_piece_size() - 1
    assert [sp.id_to_piece(i) for i in (last - 1, last)] == ["<|im_end|>", "<|im_start|>"]
    assert all(sp.is_control(i) is False and sp.is_unknown(i) is False for i in (last - 1, last))
    assert sp.encode("a<|im_end|>b", out_type=str).count("<|im_end|>") == 1  # user-defined: never split


def test_loading_it_needs_trust_remote_code_and_says_so(tiny_internlm2_sentencepiece):
    with pytest.raises(ServingError) as caught:
        LLMService(server_settings(tiny_internlm2_sentencepiece, warmup=False))
    assert caught.value.code is ErrorCode.FAILED_PRECONDITION
    assert "IVL_LLM_TRUST_REMOTE_CODE=true" in caught.value.message


def test_prompt_ids_start_with_bos_and_keep_special_tokens_whole(service):
    tok = service.tokenizer
    assert type(tok).__name__ == "IVLInternLM2Tokenizer"
    embedding = ImageEmbedding(np.zeros((256, 64), np.float32), "float32")
    messages = [ChatMessage("user", "<image>\n你好，这是什么？"), ChatMessage("assistant", "一只猫。"), ChatMessage("user", "Why?")]
    prompt = service.builder.prepare(messages, [embedding], 8)
    ids = prompt.input_ids
    assert ids[0] == tok.bos_token_id == 1 and ids.count(tok.bos_token_id) == 1
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert ids[1] == im_start and ids.count(im_start) == 5 and ids.count(im_end) == 4  # system, 3 turns, assistant
    (start, end), = prompt.embedding_ranges
    assert end - start == 256 and ids[start - 1] == tok.convert_tokens_to_ids("<img>")
    assert ids[end] == tok.convert_tokens_to_ids("</img>")
    # between the special tokens: the sentencepiece model's own pieces (each segment with its word-start mark)
    sp = SentencePieceProcessor(model_file=str(service.checkpoint.path / "tokenizer.model"))
    last_user = [i for i, t in enumerate(ids) if t == im_start][-2]
    tail = ids[last_user + 1 :]
    assert tail == [*sp.encode("user\nWhy?"), im_end, im_start, *sp.encode("assistant\n")]


def test_only_the_separator_stops(service):
    tok = service.tokenizer
    assert service.stop_token_ids == {tok.convert_tokens_to_ids("<|im_end|>")}
    assert tok.eos_token_id not in service.stop_token_ids


def test_multi_byte_text_streams_without_broken_characters(service):
    tok = service.tokenizer
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert any(p.startswith("<0x") for p in pieces)  # byte fallback: characters split over byte pieces
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) + detok.flush() == tok.decode(ids) == TEXT
    assert all("\ufffd" not in d for d in deltas)


async def test_served_over_grpc_with_reuse(tiny_internlm2_sentencepiece):
    async with (
        running_llm_server(tiny_internlm2_sentencepiece, trust_remote_code=True) as (address, _),
        grpc.aio.insecure_channel(address, options=message_size_options()) as channel,
    ):
        stub = llm_pb2_grpc.LanguageModelStub(channel)
        messages = [llm_pb2.Message(role=common_pb2.ROLE_USER, content="<image>\n这是什么？")]
        embedding = tensor_to_pb(np.full((256, 64), 0.1, np.float32))
        finals = []
        for _ in range(2):
            request = llm_pb2.GenerateRequest(messages=messages, image_embeddings=[embedding],
                                              sampling=common_pb2.SamplingParams(max_new_tokens=8))
            text = ""
            async for response in stub.Generate(request):
                text += response.delta.text
                if response.HasField("final"):
                    finals.append(response.final)
            assert "\ufffd" not in text
            messages += [llm_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=text or "?"),
                         llm_pb2.Message(role=common_pb2.ROLE_USER, content="为什么？")]
        assert finals[1].usage.cached_prompt_tokens >= finals[0].usage.prompt_tokens - 1  # BOS and all

