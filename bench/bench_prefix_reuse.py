"""Prefix KV reuse in the LLM service: a 5-turn chat about one cached image, TTFT per turn with reuse on vs
off, side by side in one run (two LLM gRPC services on the same checkpoint, turns interleaved).

    .venv/bin/python bench/bench_prefix_reuse.py                 # ~6 min on 2 cores, appends to RESULTS.md
    .venv/bin/python bench/bench_prefix_reuse.py --tiles 2 --no-append

Model: ivl_tiny's "qwen2-0.5b" preset (random weights at Qwen2-0.5B size, InternVL2-1B's LLM), fp32 on
CPU. The image is "cached": its embedding (random values, 896 wide, 256 rows per tile) is what the
gateway would send from Redis; its rows follow the reference tiling of a 1600x800 picture (max_tiles 2:
2x1 + thumbnail = 3 tiles = 768 rows; max_tiles 12: 4x2 + thumbnail = 9 tiles = 2304 rows). Each turn
sends the whole conversation, the earlier replies as the stripped text the service returned (what a
stateless OpenAI client does), greedy, --new-tokens new tokens. TTFT is the service's own
(Usage.time_to_first_token_s: from the request's arrival to the first token); reused = prompt tokens
served from the prefix cache; KV per chat = the cache's bytes after the chat (Info).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from benchlib import (
    MIB,
    add_paths,
    command_line,
    load_average,
    machine_line,
    markdown_table,
    publish,
    utc_now,
    versions,
)

add_paths("tests")

from ivl_proto.common.v1 import common_pb2  # noqa: E402
from ivl_proto.grpc_runtime import message_size_options  # noqa: E402
from ivl_proto.llm.v1 import llm_pb2, llm_pb2_grpc  # noqa: E402
from ivl_proto.tensor_codec import tensor_to_pb  # noqa: E402
from ivl_vision.tiling import TilingConfig, plan_tiles  # noqa: E402
from support.llm_server import running_llm_server  # noqa: E402

IMAGE_SIZE = (1600, 800)
QUESTIONS = (
    "<image>\nDescribe the image in detail.",
    "What is in the top left corner?",
    "Which colours dominate?",
    "Is there any text in it?",
    "Summarise everything in one sentence.",
)


@dataclass
class Turn:
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    prefill_s: float
    text: str


def checkpoint(cache_dir: Path, preset: str) -> Path:
    from ivl_tiny import spec_from_preset, write_tiny_checkpoint

    folder = cache_dir / f"{preset}-original"
    if not (folder / "config.json").exists():
        write_tiny_checkpoint(folder, spec_from_preset(preset), layout="original")
    return folder


def image_rows(max_tiles: int) -> int:
    plan = plan_tiles(*IMAGE_SIZE, TilingConfig(max_tiles=max_tiles))
    return plan.num_tiles * 256


async def ask(stub: llm_pb2_grpc.LanguageModelStub, messages: list[llm_pb2.Message], embedding: common_pb2.Tensor,
              new_tokens: int) -> Turn:
    request = llm_pb2.GenerateRequest(
        messages=messages, image_embeddings=[embedding],
        sampling=common_pb2.SamplingParams(temperature=0.0, max_new_tokens=new_tokens),
    )
    text, final = "", None
    async for response in stub.Generate(request):
        if response.HasField("final"):
            final = response.final
        else:
            text += response.delta.text
    assert final is not None
    usage = final.usage
    return Turn(usage.prompt_tokens, usage.cached_prompt_tokens, usage.time_to_first_token_s, usage.prefill_s, text)


async def chat(stubs: dict[str, llm_pb2_grpc.LanguageModelStub], rows: int, hidden: int, turns: int,
               new_tokens: int) -> dict[str, list[Turn]]:
    """The same chat on both services, turn by turn (off then on), each with its own history."""
    embedding = tensor_to_pb(np.random.default_rng(rows).standard_normal((rows, hidden)).astype(np.float32) * 0.1)
    history: dict[str, list[llm_pb2.Message]] = {name: [] for name in stubs}
    results: dict[str, list[Turn]] = {name: [] for name in stubs}
    for question in QUESTIONS[:turns]:
        for name, stub in stubs.items():
            history[name].append(llm_pb2.Message(role=common_pb2.ROLE_USER, content=question))
            turn = await ask(stub, history[name], embedding, new_tokens)
            history[name].append(llm_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=turn.text or "?"))
            results[name].append(turn)
            print(f"  {rows} rows, turn {len(results[name])}, reuse {name}: prompt {turn.prompt_tokens}, "
                  f"reused {turn.cached_tokens}, TTFT {turn.ttft_s:.2f} s", flush=True)
    return results


async def run(args: argparse.Namespace) -> str:
    folder = checkpoint(args.cache_dir, args.preset)
    load_at_start = load_average()
    common = {"torch_threads": args.threads, "max_concurrency": 1, "context_length": 8192}
    sections, summary = [], []
    async with (
        running_llm_server(folder, prefix_cache_bytes=0, **common) as (off_address, _),
        running_llm_server(folder, prefix_cache_bytes=4 * 1024**3, **common) as (on_address, on_server),
        grpc.aio.insecure_channel(off_address, options=message_size_options()) as off_channel,
        grpc.aio.insecure_channel(on_address, options=message_size_options()) as on_channel,
    ):
        stubs = {"off": llm_pb2_grpc.LanguageModelStub(off_channel), "on": llm_pb2_grpc.LanguageModelStub(on_channel)}
        hidden = on_server.service.checkpoint.hidden_size
        for max_tiles in args.tiles:
            rows = image_rows(max_tiles)
            on_server.service.backend.prefix_cache.clear()  # each chat starts cold
            results = await chat(stubs, rows, hidden, args.turns, args.new_tokens)
            info = await stubs["on"].Info(llm_pb2.InfoRequest())
            off, on = results["off"], results["on"]
            for a, b in zip(off, on, strict=True):
                assert a.text == b.text, "reuse changed a greedy reply"
            table = [
                [str(i + 1), str(b.prompt_tokens), f"{a.ttft_s:.2f}", f"{b.ttft_s:.2f}", str(b.cached_tokens),
                 f"{b.prefill_s * 1000:.0f}", f"{b.ttft_s / a.ttft_s:.3f}"]
                for i, (a, b) in enumerate(zip(off, on, strict=True))
            ]
            kv = info.prefix_cache_used_bytes
            held = on[-1].prompt_tokens + args.new_tokens - 1
            sections += [
                "", f"max_tiles {max_tiles}: {rows} image tokens ({rows // 256} tiles of a {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image)", "",
                *markdown_table(["turn", "prompt tokens", "TTFT off (s)", "TTFT on (s)", "reused tokens",
                                 "prefill on (ms)", "on / off"], table),
                "",
                f"TTFT(turn {args.turns}) / TTFT(turn 1) with reuse on: **{on[-1].ttft_s / on[0].ttft_s:.3f}** "
                f"(off: {off[-1].ttft_s / off[0].ttft_s:.2f}); KV held for the chat: {kv / MIB:.1f} MiB in "
                f"{info.prefix_cache_entries} entry (~{held} tokens, {kv / max(held, 1) / 1024:.1f} KiB per token); "
                "greedy replies identical on and off.",
            ]
            summary.append(f"max_tiles {max_tiles}: turn {args.turns}/turn 1 = {on[-1].ttft_s / on[0].ttft_s:.3f}")
    header = (
        f"\n## Prefix KV reuse: 5-turn chat about one cached image, TTFT per turn on vs off ({utc_now()})\n\n"
        f"- {machine_line(load_at_start)}; {versions('torch', 'transformers', 'grpc')}; "
        f"{torch.get_num_threads()} torch threads\n"
        f"- {command_line('bench_prefix_reuse.py', args.argv)}; qwen2-0.5b preset (random weights), fp32, "
        f"greedy, {args.new_tokens} new tokens per turn; two LLM gRPC services side by side (reuse off: "
        "IVL_LLM_PREFIX_CACHE_BYTES=0), turns interleaved off/on; TTFT = the service's (request arrival to "
        "first token)\n"
        f"- goal TTFT(turn 5) <= 0.2 x TTFT(turn 1) with reuse on: {'; '.join(summary)}\n"
    )
    return header + "\n".join(sections) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=lambda s: [int(x) for x in s.split(",")], default=[2, 12],
                        help="max_tiles values, comma separated (default 2,12)")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="qwen2-0.5b", help="ivl_tiny preset (tiny: a quick smoke run)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/ivl-bench-llm"))
    parser.add_argument("--no-append", action="store_true", help="print the table, do not touch RESULTS.md")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    text = asyncio.run(run(args))
    print(f"took {time.perf_counter() - started:.0f} s")
    publish(text, append=not args.no_append)


if __name__ == "__main__":
    main()
