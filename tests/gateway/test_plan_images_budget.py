"""PlanImages plans its images as ONE chat message would use them: they share max_tiles (the reference
demo's budget, max(1, max_tiles // n)), so what a preview shows is what Chat then really uses."""

from __future__ import annotations

import grpc
from gateway_helpers import new_png
from ivl_proto.common.v1 import common_pb2
from ivl_proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ivl_proto.grpc_runtime import message_size_options


def _grid(plan: common_pb2.ImagePlan) -> tuple[int, int, int]:
    return plan.grid_cols, plan.grid_rows, plan.num_tiles


async def test_plan_images_applies_the_multi_image_budget_that_chat_uses(stack):
    # Wide, tall and small pictures: alone with max_tiles 12 they get 6x2, 2x6 (+ thumbnail) and 1x1.
    images = [new_png(2400, 800), new_png(800, 2400), new_png(300, 300)]
    tiling = common_pb2.TilingOptions(max_tiles=12, use_thumbnail=True)
    async with grpc.aio.insecure_channel(stack.grpc_address, options=message_size_options()) as channel:
        stub = gateway_pb2_grpc.ChatStub(channel)
        alone = [
            (await stub.PlanImages(gateway_pb2.PlanImagesRequest(images=[gateway_pb2.Image(data=i)], tiling=tiling)))
            .plans[0] for i in images
        ]
        together = await stub.PlanImages(
            gateway_pb2.PlanImagesRequest(images=[gateway_pb2.Image(data=i) for i in images], tiling=tiling)
        )
        request = gateway_pb2.ChatRequest(
            messages=[gateway_pb2.ChatMessage(
                role=common_pb2.ROLE_USER,
                content=[*(gateway_pb2.ContentPart(image=gateway_pb2.Image(data=i)) for i in images),
                         gateway_pb2.ContentPart(text="Compare them.")],
            )],
            sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=2),
            tiling=tiling,
        )
        used = {e.image.image_index: e.image.plan async for e in stub.Chat(request) if e.WhichOneof("event") == "image"}
    assert [p.grid_cols * p.grid_rows for p in alone[:2]] == [12, 12]  # no budget for a single image
    # Three images share 12 tiles: each grid has at most 12 // 3 = 4 tiles (+ the thumbnail).
    assert all(p.grid_cols * p.grid_rows <= 4 for p in together.plans)
    assert [_grid(p) for p in together.plans] == [_grid(used[i]) for i in range(3)]
    assert [p.num_tokens for p in together.plans] == [used[i].num_tokens for i in range(3)]
    assert [_grid(p) for p in together.plans] == [(3, 1, 4), (1, 3, 4), (1, 1, 1)]
