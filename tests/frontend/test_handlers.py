"""The UI's handlers through Gradio's own API (gradio_client) and directly, against the real backend:
redis-server + vision + LLM + gateway on loopback (tests/support/stack.py) with a tiny checkpoint."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from ivl_frontend.app import build_demo
from ivl_frontend.chat_handler import ChatHandler
from ivl_frontend.conversation import Controls, build_request, message_turn
from ivl_frontend.gateway_client import GatewayClient
from ivl_frontend.serve import launch
from ivl_frontend.settings import FrontendSettings
from PIL import Image
from support.redis_server import free_port
from support.stack import running_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tiny_original, tmp_path_factory):
    # The folder name the launcher gives its demo checkpoint (the gateway reports tiny_random_model).
    demo_checkpoint = shutil.copytree(tiny_original, tmp_path_factory.mktemp("ui") / "tiny-demo-checkpoint")
    with running_stack(demo_checkpoint) as stack:
        yield stack


@pytest.fixture(scope="module")
def ui(stack):
    settings = FrontendSettings(gateway_address=stack.grpc_address, port=free_port(), concurrency=2)
    demo = build_demo(settings, GatewayClient(settings))
    served = launch(demo, settings)
    try:
        yield Client(served.local_url, verbose=False)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for i, (size, colour) in enumerate([((900, 500), (30, 120, 200)), ((400, 800), (200, 60, 40))]):
        path = folder / f"picture{i}.png"
        Image.new("RGB", size, colour).save(path)
        paths.append(str(path))
    return paths


def _chat(client, text, files, max_new_tokens=6, max_tiles=6):
    message = {"text": text, "files": [handle_file(f) for f in files]}
    job = client.submit(message, "You are terse.", 0.0, 1.0, max_new_tokens, max_tiles, True, api_name="/chat")
    outputs = list(job)  # every streamed update
    return outputs, job.outputs()[-1]


def _image_path(item) -> str:
    """A gallery item from gradio_client: [path, caption] or {"image": path-or-FileData, "caption": ...}."""
    image = item[0] if isinstance(item, list | tuple) else item["image"]
    return image["path"] if isinstance(image, dict) else image


def test_banner_names_the_tiny_random_model_and_how_to_switch(ui):
    banner = ui.predict(api_name="/banner")
    assert "offline tiny *random* InternVL model" in banner
    assert "huggingface-cli download OpenGVLab/" in banner and "MODEL_PATH=" in banner


def test_chat_streams_a_reply_with_stats_and_tile_previews_then_hits_the_cache(ui, pictures):
    updates, (reply, gallery, tiles_text) = _chat(ui, "Compare the two pictures.", pictures, max_new_tokens=8)
    assert len(updates) >= 3  # placeholder, tile previews, deltas, final: it streams
    text, stats = reply[0]["content"], reply[1]["metadata"]["title"]
    assert text and not text.startswith("⚠️")
    assert "cache miss (0/2 images)" in stats and "TTFT" in stats and "tokens/s" in stats
    assert len(gallery) == 2 and all(Path(_image_path(item)).is_file() for item in gallery)
    assert "2 images were cut into tiles" in tiles_text and tiles_text.count("visual tokens") == 2
    wide = Image.open(_image_path(gallery[0]))
    assert wide.width > wide.height  # the 900×500 picture, with its grid drawn
    # The API session keeps the conversation: turn 2 sends turn 1's two images again plus the same two
    # new ones, and all four come from the gateway's cache.
    _, (reply, _, _) = _chat(ui, "Again.", pictures)
    assert "cache hit (4/4 images)" in reply[1]["metadata"]["title"]


def test_plan_preview_follows_the_max_tiles_slider(ui, pictures):
    one, text_one = ui.predict({"text": "", "files": [handle_file(pictures[0])]}, 1, True, api_name="/plan_preview")
    many, text_many = ui.predict({"text": "", "files": [handle_file(pictures[0])]}, 12, True,
                                 api_name="/plan_preview")
    assert len(one) == len(many) == 1 and "1×1 grid = 1 tile ·" in text_one  # 1 tile: no thumbnail
    assert "will be cut into tiles" in text_many and "+ thumbnail" in text_many
    assert text_one != text_many


async def test_multi_turn_history_sends_earlier_images_again(stack, pictures):
    settings = FrontendSettings(gateway_address=stack.grpc_address)
    handler = ChatHandler(settings, GatewayClient(settings))
    first = [out async for out in handler.respond({"text": "What is this?", "files": [pictures[1]]}, [],
                                                  max_new_tokens=4)]
    reply = first[-1][0]
    history = [
        {"role": "user", "content": [{"type": "file", "file": {"path": pictures[1]}}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": reply[0].content}]},
        {"role": "assistant", "content": [{"type": "text", "text": "x"}], "metadata": {"title": reply[1].metadata["title"]}},
    ]
    second = [out async for out in handler.respond({"text": "And its colour?", "files": []}, history,
                                                   max_new_tokens=4)]
    stats = second[-1][0][1].metadata["title"]
    assert "cache hit (1/1 images)" in stats  # the first turn's image went again, from the cache
    await handler.client.close()


async def test_stop_cancels_the_generation_in_the_llm(stack, pictures):
    """What Gradio's Stop does: cancel the handler's task. The gRPC call is cancelled, the gateway
    passes it on, and the LLM frees its slot long before 2048 tokens are generated."""
    settings = FrontendSettings(gateway_address=stack.grpc_address)
    handler = ChatHandler(settings, GatewayClient(settings))
    scheduler = stack.llm_servers[0].service.scheduler
    deltas = 0
    streaming = asyncio.Event()

    async def consume() -> None:
        nonlocal deltas
        async for messages, _, _ in handler.respond({"text": "Talk a lot.", "files": []}, [], max_new_tokens=2048):
            if messages[0].content not in ("…", ""):
                deltas += 1
                if deltas >= 3:
                    streaming.set()

    started = time.monotonic()
    task = asyncio.create_task(consume())
    await asyncio.wait_for(streaming.wait(), 60)
    assert stack.run(_active(scheduler)) == 1
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    while stack.run(_active(scheduler)) != 0:
        assert time.monotonic() - started < 60, "the LLM still generates after Stop"
        await asyncio.sleep(0.02)
    busy_s = time.monotonic() - started
    # The next request is served at once, and its decode speed says how long 2048 tokens would take.
    final = None
    async for event in handler.client.chat(build_request([message_turn("hi", 1)], Controls(max_new_tokens=64), "t")):
        final = event.final if event.WhichOneof("event") == "final" else final
    assert final is not None and final.usage.completion_tokens > 0
    full_run_s = 2048 / final.usage.decode_tokens_per_s
    assert busy_s < 0.5 * full_run_s, f"slot busy {busy_s:.2f} s; a full run takes ~{full_run_s:.2f} s"
    await handler.client.close()


async def _active(scheduler) -> int:
    return scheduler.active


async def test_gateway_errors_become_readable_chat_messages(stack, tmp_path):
    settings = FrontendSettings(gateway_address=stack.grpc_address)
    handler = ChatHandler(settings, GatewayClient(settings))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG file")
    out = [o async for o in handler.respond({"text": "What is this?", "files": [str(broken)]}, [])]
    text = out[-1][0][0].content
    assert text.startswith("⚠️ **Error (invalid_argument):**"), text
    await handler.client.close()

    down = FrontendSettings(gateway_address=f"127.0.0.1:{free_port()}", info_timeout_s=2, gateway_timeout_s=5)
    offline = ChatHandler(down, GatewayClient(down))
    assert "The gateway is not reachable" in await offline.banner()
    out = [o async for o in offline.respond({"text": "hello", "files": []}, [])]
    assert "⚠️ **Error (unavailable):**" in out[-1][0][0].content and down.gateway_address in out[-1][0][0].content
    await offline.client.close()
