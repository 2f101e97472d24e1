"""The real vision gRPC server (loopback port 0, real tiny checkpoint): RPCs, limits, errors."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ivl_proto.common.v1 import common_pb2
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.tensor_codec import tensor_from_pb
from ivl_proto.vision.v1 import vision_pb2, vision_pb2_grpc
from ivl_vision.checkpoint import load_vision_encoder
from ivl_vision.image_io import ImageLimits
from ivl_vision.preprocess import preprocess_trusted
from ivl_vision.tiling import TilingConfig, plan_tiles
from support.vision_server import running_vision_server

TOKENS = 256
MAX_IMAGES = 4  # as the vision_server fixture in conftest.py sets it (checked by the Info test)


@pytest.fixture(scope="module")
def reference_encoder(tiny_original):
    return load_vision_encoder(tiny_original)


def expected_embedding(encoder, data: bytes, config: TilingConfig) -> np.ndarray:
    """What the service must return: the encoder run directly on the preprocessed pixels."""
    pixels = preprocess_trusted(data, config, ImageLimits()).pixels
    with torch.inference_mode():
        out = encoder.encode(torch.from_numpy(pixels))
    return out.reshape(-1, out.shape[-1]).numpy()


async def expect_invalid(call, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    details = caught.value.details()
    for fragment in fragments:
        assert fragment in details, details
    return details


async def test_encode_two_images_matches_the_encoder(vision_stub, reference_encoder, make_png):
    wide, tall = make_png(800, 600, seed=1), make_png(300, 900, seed=2)
    request = vision_pb2.EncodeImagesRequest(
        images=[
            vision_pb2.ImageInput(data=wide),
            vision_pb2.ImageInput(data=tall, tiling=common_pb2.TilingOptions(max_tiles=3)),
        ],
        tiling=common_pb2.TilingOptions(max_tiles=6),
    )
    response = await vision_stub.EncodeImages(request)
    info = reference_encoder.info
    assert response.fingerprint == info.fingerprint
    assert response.preprocess_s > 0 and response.encode_s > 0
    base = TilingConfig(image_size=448, min_tiles=1, max_tiles=12, use_thumbnail=True)
    configs = [base.with_overrides(6, None, None), base.with_overrides(3, None, None)]
    for data, config, encoded, size in zip(
        (wide, tall), configs, response.images, ((800, 600), (300, 900)), strict=True
    ):
        plan = plan_tiles(*size, config)
        assert (encoded.plan.grid_cols, encoded.plan.grid_rows) == (plan.grid_cols, plan.grid_rows)
        assert encoded.plan.num_tiles == plan.num_tiles
        assert encoded.plan.num_tokens == plan.num_tiles * TOKENS
        assert (encoded.plan.original_width, encoded.plan.original_height) == size
        assert encoded.plan.max_tiles == config.max_tiles and encoded.plan.use_thumbnail
        embedding = tensor_from_pb(encoded.embedding)
        assert encoded.embedding.dtype == "float32"
        assert embedding.shape == (plan.num_tiles * TOKENS, info.llm_hidden_size)
        np.testing.assert_allclose(embedding, expected_embedding(reference_encoder, data, config), rtol=1e-5, atol=1e-5)
    assert response.images[0].plan.num_tiles == 7  # 3x2 grid + thumbnail
    assert response.images[1].plan.num_tiles == 4  # 1x3 grid + thumbnail


async def test_plan_images_from_headers_and_sizes(vision_stub, make_png):
    request = vision_pb2.PlanImagesRequest(
        images=[vision_pb2.ImageInput(data=make_png(1000, 500), tiling=common_pb2.TilingOptions(use_thumbnail=False))],
        sizes=[vision_pb2.ImageSize(width=3840, height=2160), vision_pb2.ImageSize(width=448, height=448)],
        tiling=common_pb2.TilingOptions(max_tiles=24),
    )
    response = await vision_stub.PlanImages(request)
    assert len(response.plans) == 3
    base = TilingConfig()
    expected = [
        plan_tiles(1000, 500, base.with_overrides(24, None, False)),
        plan_tiles(3840, 2160, base.with_overrides(24, None, None)),
        plan_tiles(448, 448, base.with_overrides(24, None, None)),
    ]
    for got, want in zip(response.plans, expected, strict=True):
        assert (got.grid_cols, got.grid_rows, got.num_tiles) == (want.grid_cols, want.grid_rows, want.num_tiles)
        assert got.has_thumbnail == want.has_thumbnail
        assert got.num_tokens == want.num_tiles * TOKENS
        assert got.max_tiles == 24
    assert not response.plans[0].has_thumbnail and not response.plans[0].use_thumbnail
    assert response.plans[2].num_tiles == 1


async def test_info_describes_model_limits_and_batching(vision_stub, reference_encoder):
    info = await vision_stub.Info(vision_pb2.InfoRequest())
    model = reference_encoder.info
    assert info.model_id == model.model_id and info.fingerprint == model.fingerprint
    assert info.hidden_size == model.llm_hidden_size == 64
    assert info.tokens_per_tile == TOKENS and info.image_size == 448
    assert info.dtype == "float32" and info.device == "cpu"
    assert info.ps_version == "v2" and info.downsample_ratio == pytest.approx(0.5)
    assert info.default_tiling.max_tiles == 12 and info.default_tiling.min_tiles == 1
    assert info.default_tiling.use_thumbnail
    assert info.max_tiles_limit == 40 and info.max_images_per_request == MAX_IMAGES
    assert info.max_image_pixels == 80_000_000 and info.max_image_bytes == 32 * 2**20
    assert info.batching.enabled and info.batching.max_batch_tiles == 64


@pytest.mark.parametrize(
    ("images", "tiling", "fragments"),
    [
        ([], None, ["no images"]),
        (["ok"] * (MAX_IMAGES + 1), None, [f"{MAX_IMAGES + 1} images", f"limit is {MAX_IMAGES}"]),
        (["ok", b""], None, ["image 1", "empty"]),
        (["ok", "corrupt"], None, ["image 1", "could not decode"]),
        (["bomb"], None, ["image 0", "30000x30000", "limit is 80.0 MP"]),
        (["ok", "ok", b"%PDF-1.7 this is a document, not an image"], None, ["image 2", "could not decode"]),
        (["ok"], common_pb2.TilingOptions(max_tiles=0), ["request tiling", "max_tiles is 0"]),
        (["ok"], common_pb2.TilingOptions(max_tiles=41), ["max_tiles is 41", "40"]),
        (["ok"], common_pb2.TilingOptions(min_tiles=13), ["min_tiles is 13"]),
    ],
    ids=["no-images", "too-many", "empty-bytes", "corrupt", "bomb", "wrong-type", "max-tiles-0", "max-tiles-41", "min-over-max"],
)
async def test_bad_encode_requests_are_invalid_argument(vision_stub, make_png, make_png_bomb, images, tiling, fragments):
    good = make_png(64, 48)
    corrupt = good[:40] + b"\0" * 40 + good[80:]
    named = {"ok": good, "corrupt": corrupt, "bomb": make_png_bomb(30000, 30000)}
    request = vision_pb2.EncodeImagesRequest(
        images=[vision_pb2.ImageInput(data=named.get(item, item) if isinstance(item, str) else item) for item in images]
    )
    if tiling is not None:
        request.tiling.CopyFrom(tiling)
    await expect_invalid(vision_stub.EncodeImages(request), *fragments)


async def test_bad_per_image_tiling_names_the_image(vision_stub, make_png):
    request = vision_pb2.EncodeImagesRequest(
        images=[
            vision_pb2.ImageInput(data=make_png(32, 32)),
            vision_pb2.ImageInput(data=make_png(32, 32), tiling=common_pb2.TilingOptions(max_tiles=41)),
        ]
    )
    await expect_invalid(vision_stub.EncodeImages(request), "image 1", "max_tiles is 41")


async def test_bad_plan_requests_are_invalid_argument(vision_stub, make_png_bomb):
    await expect_invalid(vision_stub.PlanImages(vision_pb2.PlanImagesRequest()), "no images or sizes")
    bad_size = vision_pb2.PlanImagesRequest(sizes=[vision_pb2.ImageSize(width=10, height=10), vision_pb2.ImageSize(width=0, height=5)])
    await expect_invalid(vision_stub.PlanImages(bad_size), "size 1", "0x5")
    huge = vision_pb2.PlanImagesRequest(sizes=[vision_pb2.ImageSize(width=20000, height=20000)])
    await expect_invalid(vision_stub.PlanImages(huge), "size 0", "400.0 MP")
    bomb = vision_pb2.PlanImagesRequest(images=[vision_pb2.ImageInput(data=make_png_bomb(30000, 30000))])
    await expect_invalid(vision_stub.PlanImages(bomb), "image 0", "900.0 MP")


async def test_reflection_lists_the_services(vision_server):
    address, _ = vision_server
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = set()
        async for response in stub.ServerReflectionInfo(requests()):
            names.update(service.name for service in response.list_services_response.service)
    assert {"ivl.vision.v1.VisionEncoder", "grpc.health.v1.Health"} <= names


async def test_forty_tile_response_passes_the_message_limit(tiny_ckpt_factory, make_png):
    """41 tiles x 256 tokens x 256 hidden x 4 bytes = 10.7 MB: over gRPC's 4 MiB default."""
    wide_llm = tiny_ckpt_factory("original", llm_hidden=256, llm_intermediate=256)
    image = make_png(1600, 1000)  # 8:5 -> an 8x5 grid at max_tiles 40, + thumbnail
    request = vision_pb2.EncodeImagesRequest(
        images=[vision_pb2.ImageInput(data=image)], tiling=common_pb2.TilingOptions(max_tiles=40)
    )
    async with running_vision_server(wide_llm, warmup=False) as (address, _server):
        async with grpc.aio.insecure_channel(address, options=message_size_options()) as channel:
            response = await vision_pb2_grpc.VisionEncoderStub(channel).EncodeImages(request, timeout=120)
            # the server accepts a 5 MiB request too (gRPC's default would refuse it unread)
            big_request = vision_pb2.PlanImagesRequest(images=[vision_pb2.ImageInput(data=b"\0" * (5 * 2**20))])
            await expect_invalid(vision_pb2_grpc.VisionEncoderStub(channel).PlanImages(big_request), "could not decode")
        async with grpc.aio.insecure_channel(address) as default_channel:  # proof the size matters
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await vision_pb2_grpc.VisionEncoderStub(default_channel).EncodeImages(request, timeout=120)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    (encoded,) = response.images
    assert encoded.plan.num_tiles == 41 and (encoded.plan.grid_cols, encoded.plan.grid_rows) == (8, 5)
    assert len(encoded.embedding.data) == 41 * TOKENS * 256 * 4 > 4 * 2**20
    assert tensor_from_pb(encoded.embedding).shape == (41 * TOKENS, 256)



async def test_client_deadline_removes_the_request_from_the_queue(tiny_original, make_png):
    """A call that gives up (deadline) while waiting for a forward frees its place in the queue."""
    request = vision_pb2.EncodeImagesRequest(images=[vision_pb2.ImageInput(data=make_png(64, 64))])
    async with (
        running_vision_server(tiny_original, batch_wait_ms=10_000, max_batch_tiles=64, warmup=False) as (address, server),
        grpc.aio.insecure_channel(address, options=message_size_options()) as channel,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await vision_pb2_grpc.VisionEncoderStub(channel).EncodeImages(request, timeout=0.5)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        stats = server.service.batcher.stats
        for _ in range(200):
            if stats.cancelled_requests:
                break
            await asyncio.sleep(0.01)
        assert stats.cancelled_requests == 1 and server.service.batcher.queued_tiles == 0
        assert stats.forwards == 0

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("device", "dtype", "want_dtype", "tolerance"),
    [
        ("cpu", "bfloat16", "bfloat16", 0.05),
        pytest.param("cuda", "auto", "bfloat16", 0.05, marks=[pytest.mark.gpu, CUDA]),
        pytest.param("cuda", "float32", "float32", 0.01, marks=[pytest.mark.gpu, CUDA]),  # TF32 convolutions
    ],
)
async def test_16_bit_and_cuda_encoding_match_the_fp32_cpu_encoder(
    tiny_original, reference_encoder, make_png, device, dtype, want_dtype, tolerance
):
    """bfloat16 embeddings travel as their bit pattern (dtype "bfloat16"); dtype auto = bf16 on CUDA."""
    image = make_png(900, 500, seed=3)
    request = vision_pb2.EncodeImagesRequest(
        images=[vision_pb2.ImageInput(data=image)], tiling=common_pb2.TilingOptions(max_tiles=4)
    )
    async with (
        running_vision_server(tiny_original, device=device, dtype=dtype) as (address, _server),
        grpc.aio.insecure_channel(address, options=message_size_options()) as channel,
    ):
        stub = vision_pb2_grpc.VisionEncoderStub(channel)
        info = await stub.Info(vision_pb2.InfoRequest())
        response = await stub.EncodeImages(request)
    assert info.device.startswith(device) and info.dtype == want_dtype
    (encoded,) = response.images
    assert encoded.embedding.dtype == want_dtype
    raw = tensor_from_pb(encoded.embedding)
    got = torch.from_numpy(raw.copy()).view(torch.bfloat16).float().numpy() if want_dtype == "bfloat16" else raw
    want = expected_embedding(reference_encoder, image, TilingConfig().with_overrides(4, None, None))
    assert got.shape == want.shape == (encoded.plan.num_tiles * TOKENS, 64)
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("embedding_dtype", ["bfloat16", "float16"])
async def test_embeddings_are_cast_to_the_embedding_dtype(tiny_original, reference_encoder, make_png, embedding_dtype):
    """IVL_VISION_EMBEDDING_DTYPE: an fp32 encoder sends 16-bit embeddings (the fp32 result rounded, half the bytes),
    Info says so, and the fingerprint differs from the fp32 one (cache keys never mix dtypes)."""
    data = make_png(640, 480, seed=5)
    async with (running_vision_server(tiny_original, embedding_dtype=embedding_dtype) as (address, _),
                grpc.aio.insecure_channel(address, options=message_size_options()) as channel):
        stub = vision_pb2_grpc.VisionEncoderStub(channel)
        info = await stub.Info(vision_pb2.InfoRequest())
        response = await stub.EncodeImages(vision_pb2.EncodeImagesRequest(
            images=[vision_pb2.ImageInput(data=data)], tiling=common_pb2.TilingOptions(max_tiles=2)))
    assert info.dtype == "float32" and info.embedding_dtype == embedding_dtype
    assert info.fingerprint != reference_encoder.info.fingerprint
    assert response.fingerprint == info.fingerprint
    encoded = response.images[0].embedding
    assert encoded.dtype == embedding_dtype
    expected = torch.from_numpy(expected_embedding(reference_encoder, data, TilingConfig(max_tiles=2)))
    expected = expected.to(getattr(torch, embedding_dtype))
    got = torch.from_numpy(tensor_from_pb(encoded).copy())
    got = got.view(torch.bfloat16) if embedding_dtype == "bfloat16" else got
    assert len(encoded.data) == expected.numel() * 2
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_auto_embedding_dtype_follows_a_16_bit_checkpoint():
    from ivl_vision.settings import VisionSettings

    settings = VisionSettings.model_construct(embedding_dtype="auto")
    assert settings.resolved_embedding_dtype("float32", "bfloat16") == "bfloat16"  # CPU fp32 compute of a bf16 model
    assert settings.resolved_embedding_dtype("float32", "float32") == "float32"
    assert settings.resolved_embedding_dtype("bfloat16", None) == "bfloat16"
    assert settings.resolved_embedding_dtype("float16", "bfloat16") == "float16"  # never changed when 16-bit already
    explicit = VisionSettings.model_construct(embedding_dtype="float32")
    assert explicit.resolved_embedding_dtype("bfloat16", "bfloat16") == "float32"  # widened only when asked
