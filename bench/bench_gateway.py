"""Gateway benchmark: what the embedding cache buys, measured side by side in one run.

1. Time to first token through the gateway (gRPC Chat) for a NEW image vs the SAME image again
   (a Redis cache hit: no vision work at all).
2. Total time of a 5-turn chat about one image: through the gateway (the image is encoded once, later
   turns hit the cache; the LLM re-prefills the history every turn, as LMDeploy does with embeddings)
   vs the same 5 turns through transformers' all-in-one InternVLForConditionalGeneration, which
   re-encodes the image every turn (pixel_values from ivl_vision.tiling, the same prompt text).

The checkpoint is ivl_tiny's "encoder-heavy" preset (InternViT-300M width, few layers, tiny LLM), so
that encoding dominates as it does with real InternVL models. Everything runs on this machine's CPU in
fp32 with the same torch thread count; the stack is real (redis-server, vision and LLM gRPC services,
gateway) on loopback.

    .venv/bin/python bench/bench_gateway.py                  # appends to bench/RESULTS.md
    .venv/bin/python bench/bench_gateway.py --quick --no-append
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from benchlib import add_paths, command_line, cpu_model, markdown_table, publish, utc_now, versions
from ivl_proto.common.v1 import common_pb2
from ivl_proto.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from ivl_proto.grpc_runtime import message_size_options
from ivl_tiny import write_tiny_checkpoint
from ivl_tiny.spec import spec_from_preset
from PIL import Image

add_paths("tests")
from support.stack import running_stack  # noqa: E402

HEADING = "## Gateway: embedding cache, TTFT and a 5-turn chat vs transformers all-in-one (bench/bench_gateway.py)"
QUESTIONS = [
    "What is in this image?",
    "Describe the colours.",
    "What is on the left side?",
    "Is there any text?",
    "Summarise in one sentence.",
]


def photo_like(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy, "RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def chat_request(messages: list[tuple[int, list]], args: argparse.Namespace) -> gateway_pb2.ChatRequest:
    pb_messages = []
    for role, parts in messages:
        content = [gateway_pb2.ContentPart(image=gateway_pb2.Image(data=p)) if isinstance(p, bytes)
                   else gateway_pb2.ContentPart(text=p) for p in parts]
        pb_messages.append(gateway_pb2.ChatMessage(role=role, content=content))
    return gateway_pb2.ChatRequest(
        messages=pb_messages,
        sampling=common_pb2.SamplingParams(temperature=0, max_new_tokens=args.new_tokens),
        tiling=common_pb2.TilingOptions(max_tiles=args.max_tiles, use_thumbnail=True),
    )


async def one_turn(stub: gateway_pb2_grpc.ChatStub, request: gateway_pb2.ChatRequest) -> dict:
    start = time.perf_counter()
    ttft = None
    text: list[str] = []
    final = None
    tiles = 0
    async for event in stub.Chat(request):
        kind = event.WhichOneof("event")
        if kind == "image":
            tiles += event.image.plan.num_tiles
        elif kind == "delta":
            ttft = ttft or time.perf_counter() - start
            text.append(event.delta)
        elif kind == "final":
            final = event.final
    total = time.perf_counter() - start
    return {"ttft": ttft or total, "total": total, "text": "".join(text), "hits": final.cache_hits,
            "images": final.images, "tokens": final.usage.completion_tokens, "vision_s": final.vision_s,
            "tiles": tiles}


async def gateway_side(address: str, args: argparse.Namespace) -> dict:
    user, assistant = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT
    async with grpc.aio.insecure_channel(address, options=message_size_options()) as channel:
        stub = gateway_pb2_grpc.ChatStub(channel)
        await one_turn(stub, chat_request([(user, [photo_like(320, 160, 999), "warm up"])], args))
        new, hit = [], []
        for repeat in range(args.repeats):
            image = photo_like(args.width, args.height, seed=repeat)
            request = chat_request([(user, [image, QUESTIONS[0]])], args)
            first = await one_turn(stub, request)
            second = await one_turn(stub, request)
            assert first["hits"] == 0 and second["hits"] == 1, (first, second)
            new.append(first["ttft"])
            hit.append(second["ttft"])
        image = photo_like(args.width, args.height, seed=1000)
        history: list[tuple[int, list]] = []
        turns = []
        started = time.perf_counter()
        for index in range(args.turns):
            parts = [image, QUESTIONS[index % len(QUESTIONS)]] if index == 0 else [QUESTIONS[index % len(QUESTIONS)]]
            history.append((user, parts))
            result = await one_turn(stub, chat_request(history, args))
            history.append((assistant, [result["text"] or "ok"]))
            turns.append(result)
        chat_total = time.perf_counter() - started
    return {"ttft_new": new, "ttft_hit": hit, "chat_total": chat_total, "turns": turns, "image": image}


def allinone_side(model_path: Path, image_bytes: bytes, args: argparse.Namespace) -> dict:
    from ivl_llm.templates import ChatMessage, build_prompt, get_template
    from ivl_proto.image_placeholder import expand_placeholders
    from ivl_vision.image_io import ImageLimits, decode_image
    from ivl_vision.tiling import TilingConfig, plan_tiles, tile_pixels
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    template = get_template(args.template)
    config = TilingConfig(max_tiles=args.max_tiles, use_thumbnail=True)
    vision_seconds = [0.0]  # how much of a turn is vision work: forward hooks on the tower + projector
    marks: dict[str, float] = {}
    for name in ("vision_tower", "multi_modal_projector"):
        module = getattr(model.model, name)
        module.register_forward_pre_hook(lambda *_, n=name: marks.__setitem__(n, time.perf_counter()))
        module.register_forward_hook(
            lambda *_, n=name: vision_seconds.__setitem__(0, vision_seconds[0] + time.perf_counter() - marks[n])
        )

    def turn(messages: list[ChatMessage]) -> tuple[float, str, int]:
        start = time.perf_counter()
        image = decode_image(image_bytes, ImageLimits())  # every turn, as an all-in-one server does
        plan = plan_tiles(image.width, image.height, config)
        pixels = torch.from_numpy(tile_pixels(image, plan, config))
        text = expand_placeholders(build_prompt(template, messages), [plan.num_tiles * 256])
        inputs = tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, pixel_values=pixels, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False)
        new_ids = out[0, inputs["input_ids"].shape[1]:]
        return time.perf_counter() - start, tokenizer.decode(new_ids, skip_special_tokens=True), len(new_ids)

    turn([ChatMessage("user", "<image>\nwarm up")])
    vision_seconds[0] = 0.0
    history: list[ChatMessage] = []
    times = []
    started = time.perf_counter()
    for index in range(args.turns):
        question = QUESTIONS[index % len(QUESTIONS)]
        history.append(ChatMessage("user", f"<image>\n{question}" if index == 0 else question))
        seconds, reply, _ = turn(history)
        history.append(ChatMessage("assistant", reply or "ok"))
        times.append(seconds)
    return {"chat_total": time.perf_counter() - started, "turns": times, "vision_s": vision_seconds[0]}


def machine() -> str:
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    return (f"{cpu_model()}, {torch.get_num_threads()} torch threads; "
            f"{versions('torch', 'transformers', 'grpc')}, redis {redis}")


def report(args: argparse.Namespace, gw: dict, aio: dict, spec_text: str, elapsed: float) -> str:
    new, hit = statistics.median(gw["ttft_new"]), statistics.median(gw["ttft_hit"])
    per_turn_gw = " / ".join(f"{t['total']:.2f}" for t in gw["turns"])
    per_turn_aio = " / ".join(f"{t:.2f}" for t in aio["turns"])
    hits = [t["hits"] for t in gw["turns"]]
    lines = [
        "", HEADING, "",
        f"- date: {utc_now()}; machine: {machine()}",
        f"- model: {spec_text}; image {args.width}x{args.height} JPEG, max_tiles {args.max_tiles} + thumbnail "
        f"= {gw['turns'][0]['tiles']} tiles; {args.new_tokens} new tokens per turn, greedy, fp32 CPU",
        f"- command: {command_line('bench_gateway.py', args.argv)} ({elapsed:.0f} s)",
        "",
        *markdown_table(["measurement", "value"], [
            (f"TTFT, new image (encode + prefill), median of {args.repeats}", f"{new * 1000:.0f} ms"),
            ("TTFT, same image again (cache hit)", f"{hit * 1000:.0f} ms"),
            ("TTFT ratio new / cached", f"**{new / hit:.1f}x**"),
            (f"{args.turns}-turn chat through the gateway (total)", f"{gw['chat_total']:.2f} s ({per_turn_gw})"),
            (f"{args.turns}-turn chat, transformers all-in-one (re-encodes every turn)",
             f"{aio['chat_total']:.2f} s ({per_turn_aio})"),
            ("of which vision work (all-in-one: vision tower + projector; gateway: cache + encode)",
             f"{aio['vision_s']:.2f} s / {sum(t['vision_s'] for t in gw['turns']):.2f} s"),
            ("all-in-one / gateway", f"**{aio['chat_total'] / gw['chat_total']:.2f}x**"),
            ("gateway cache hits per turn", hits),
        ]),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="encoder-heavy")
    parser.add_argument("--vision-layers", type=int, default=None, help="override the preset's layer count")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--max-tiles", type=int, default=2, help="1024x512 at 2 -> 2x1 grid + thumbnail = 3 tiles")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--template", default="internlm2-chat")
    parser.add_argument("--quick", action="store_true", help="tiny vision (smoke run of the script)")
    parser.add_argument("--no-append", action="store_true", help="print the table, do not touch RESULTS.md")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {"vision_layers": args.vision_layers}
    if args.quick:
        args.preset, args.repeats, args.turns = "tiny", 1, 2
    spec = spec_from_preset(args.preset, **overrides)
    spec_text = (f"ivl_tiny preset '{args.preset}' (vision hidden {spec.vision_hidden} x {spec.vision_layers} layers, "
                 f"LLM hidden {spec.llm_hidden} x {spec.llm_layers} layers)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ivl-bench-gateway-") as tmp:
        model_path = write_tiny_checkpoint(Path(tmp) / "ckpt", spec, layout="native")
        with running_stack(
            model_path, gateway={"default_max_tiles": args.max_tiles},
            vision={"torch_threads": args.threads}, llm={"torch_threads": args.threads},
        ) as stack:
            gw = asyncio.run(gateway_side(stack.grpc_address, args))
        aio = allinone_side(model_path, gw["image"], args)
    table = report(args, gw, aio, spec_text, time.perf_counter() - started)
    publish(table, append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
