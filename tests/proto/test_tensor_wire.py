"""ivl_proto.tensor_wire: the embedding messages written and read around their data are exactly protobuf's."""

from __future__ import annotations

import numpy as np
import pytest
from ivl_gateway.embedding_codec import ImageEmbedding, decode_entry, encode_entry
from ivl_gateway.llm_client import generate_request_bytes
from ivl_gateway.vision_client import parse_encode_reply
from ivl_llm.servicer import GenerateCall, Undecodable, parse_generate
from ivl_proto import tensor_wire
from ivl_proto.common.v1 import common_pb2
from ivl_proto.llm.v1 import llm_pb2
from ivl_proto.tensor_codec import tensor_from_pb, tensor_to_pb, tensor_to_wire
from ivl_proto.vision.v1 import vision_pb2

ARRAYS = [
    (np.arange(12, dtype=np.float32).reshape(3, 4), None),
    (np.arange(2 * 256 * 8, dtype=np.float16).reshape(512, 8), None),
    (np.arange(70000, dtype=np.uint16).reshape(7, 10000), "bfloat16"),  # lengths over one varint byte
    (np.zeros((0, 5), dtype=np.float32), None),  # no data at all
    (np.float32(3.5).reshape(()), None),  # no shape
]


@pytest.mark.parametrize(("array", "dtype"), ARRAYS)
def test_wire_tensor_is_protobufs_tensor(array, dtype):
    raw = tensor_wire.join(tensor_to_wire(array, dtype).pieces())
    assert common_pb2.Tensor.FromString(raw) == tensor_to_pb(array, dtype)
    assert raw == tensor_to_pb(array, dtype).SerializeToString()  # same field order as protobuf writes


def test_generate_request_bytes_parse_as_the_message():
    arrays = [a for a, d in ARRAYS[:3]]
    dtypes = [d for a, d in ARRAYS[:3]]
    head = llm_pb2.GenerateRequest(
        messages=[llm_pb2.Message(role=common_pb2.ROLE_USER, content="<image>\nhi")], request_id="r1",
        sampling=common_pb2.SamplingParams(max_new_tokens=3))
    raw = generate_request_bytes(head, [tensor_to_wire(a, d) for a, d in zip(arrays, dtypes, strict=True)])
    expected = llm_pb2.GenerateRequest()
    expected.CopyFrom(head)
    expected.image_embeddings.extend(tensor_to_pb(a, d) for a, d in zip(arrays, dtypes, strict=True))
    assert llm_pb2.GenerateRequest.FromString(raw) == expected
    call = parse_generate(expected.SerializeToString())  # what the LLM service reads, from protobuf's bytes
    assert isinstance(call, GenerateCall)
    assert call.request.messages == head.messages and call.request.request_id == "r1"
    assert all(t.data == b"" for t in call.request.image_embeddings)
    for tensor, data, array in zip(call.request.image_embeddings, call.embedding_data, arrays, strict=True):
        assert np.array_equal(tensor_from_pb(tensor, data=data).view(array.dtype), array)


def test_encode_response_written_and_read_without_copies():
    from ivl_vision.service import EncodedImage, EncodeResult, PlannedImage
    from ivl_vision.servicer import encode_response_bytes
    from ivl_vision.tiling import TilingConfig, plan_tiles

    plan = plan_tiles(800, 600, TilingConfig(max_tiles=6))
    arrays = [np.random.default_rng(i).standard_normal((plan.num_tiles * 4, 6)).astype(np.float32) for i in range(2)]
    planned = PlannedImage(plan, TilingConfig(max_tiles=6), plan.num_tiles * 4)
    result = EncodeResult([EncodedImage(a, "float32", planned) for a in arrays], 0.25, 0.5, "fp1")
    raw = encode_response_bytes(result)
    response = vision_pb2.EncodeImagesResponse.FromString(raw)
    assert (response.preprocess_s, response.encode_s, response.fingerprint) == (0.25, 0.5, "fp1")
    for image, array in zip(response.images, arrays, strict=True):
        assert np.array_equal(tensor_from_pb(image.embedding), array)
        assert image.plan.num_tiles == plan.num_tiles and image.plan.max_tiles == 6
    reply = parse_encode_reply(raw)
    assert reply.response.fingerprint == "fp1" and reply.response.images[1].plan == response.images[1].plan
    for image, data, array in zip(reply.response.images, reply.embedding_data, arrays, strict=True):
        assert data.obj is raw  # a view into the received bytes
        assert np.array_equal(tensor_from_pb(image.embedding, data=data), array)


def test_malformed_bytes_are_refused():
    for raw in (b"\x12\xff\xff\xff\xff\x0f", b"\x12\x05ab", b"\x0f", b"\x80"):
        with pytest.raises(ValueError):
            tensor_wire.split_tensors(llm_pb2.GenerateRequest, raw, (2,))
        assert isinstance(parse_generate(raw), Undecodable)


def test_cache_entry_payload_is_a_view():
    data = np.arange(256 * 8, dtype=np.uint16).tobytes()
    embedding = ImageEmbedding("bfloat16", (256, 8), memoryview(data), common_pb2.ImagePlan(num_tiles=1))
    value = encode_entry("k", embedding)
    back = decode_entry("k", value, 8)
    assert isinstance(back.data, memoryview) and back.data.obj is value and back.data == data
    assert tensor_wire.join(back.to_wire().pieces()) == embedding.to_tensor_pb().SerializeToString()
