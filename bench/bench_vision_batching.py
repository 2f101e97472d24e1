"""Vision encoder throughput with dynamic batching on vs off, through the real gRPC server.

For each concurrency level (1, 2, 4, 8, 16 clients each sending EncodeImages in a loop) and each
workload ("1-tile": one small image per request at max_tiles 1; "mixed": images of several sizes at
max_tiles 6, 1..7 tiles each), the same requests run against three `python -m ivl_vision` server
processes loaded side by side: batching off (one request per forward), on with wait 0 (a forward takes whatever queued
while the previous one ran) and on with a wait of --wait-ms. The encoder is a
random InternViT written by ivl_tiny (sizes below), big enough that compute dominates.

    .venv/bin/python bench/bench_vision_batching.py                  # appends to bench/RESULTS.md
    .venv/bin/python bench/bench_vision_batching.py --quick --no-append
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from benchlib import RESULTS, add_paths, command_line, cpu_model, markdown_table, publish, utc_now, versions
from ivl_proto.common.v1 import common_pb2
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.vision.v1 import vision_pb2, vision_pb2_grpc
from ivl_tiny import TinySpec, write_tiny_checkpoint
from PIL import Image

add_paths("tests")
from support.redis_server import free_port  # noqa: E402
from support.service_processes import ServiceProcess  # noqa: E402
from vision_load import encode_clients  # noqa: E402

HEADING = "## Vision encoder: dynamic batching on vs off (bench/bench_vision_batching.py)"
MIXED_SIZES = ((640, 480), (300, 900), (1024, 1024), (800, 200), (96, 96), (1280, 720))


@dataclass(frozen=True)
class Outcome:
    tiles_per_s: float
    p50_ms: float
    avg_batch: float


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def workloads() -> dict[str, list[vision_pb2.EncodeImagesRequest]]:
    one = [
        vision_pb2.EncodeImagesRequest(
            images=[vision_pb2.ImageInput(data=png(64, 64, i))], tiling=common_pb2.TilingOptions(max_tiles=1)
        )
        for i in range(8)
    ]
    mixed = [
        vision_pb2.EncodeImagesRequest(
            images=[vision_pb2.ImageInput(data=png(w, h, i))], tiling=common_pb2.TilingOptions(max_tiles=6)
        )
        for i, (w, h) in enumerate(MIXED_SIZES)
    ]
    return {"1-tile": one, "mixed": mixed}


async def drive(address: str, requests: list[vision_pb2.EncodeImagesRequest], clients: int, total: int) -> tuple[float, int, list[float]]:
    """`clients` loops share `total` requests; returns (seconds, tiles, latencies)."""
    async with grpc.aio.insecure_channel(address, options=message_size_options()) as channel:
        stub = vision_pb2_grpc.VisionEncoderStub(channel)
        await stub.EncodeImages(requests[0], timeout=600)  # connection + first-call warm-up
        started = time.perf_counter()
        tiles, latencies = await encode_clients(stub, requests, clients, total)
        return time.perf_counter() - started, tiles, latencies


MODES = ("off", "on, wait 0", "on, wait N")


def vision_process(model: Path, mode: str, args: argparse.Namespace) -> ServiceProcess:
    """`python -m ivl_vision` in a child process, as users run it, configured for one batching mode."""
    env = {
        "IVL_VISION_MODEL_PATH": str(model), "IVL_VISION_DEVICE": args.device,
        "IVL_VISION_DTYPE": args.dtype, "IVL_VISION_BATCHING": "false" if mode == "off" else "true",
        "IVL_VISION_MAX_BATCH_TILES": str(args.max_batch_tiles),
        "IVL_VISION_BATCH_WAIT_MS": str(args.wait_ms if mode == "on, wait N" else 0.0),
        "IVL_VISION_MAX_QUEUED_TILES": "4096", "IVL_VISION_PREPROCESS_WORKERS": str(args.preprocess_workers),
    }
    if args.threads:
        env["IVL_VISION_TORCH_THREADS"] = str(args.threads)
    port = free_port()
    return ServiceProcess(f"vision ({mode})", "ivl_vision", {**env, "IVL_VISION_PORT": str(port)}, port)


async def batching_stats(address: str) -> vision_pb2.BatchingStats:
    async with grpc.aio.insecure_channel(address) as channel:
        return (await vision_pb2_grpc.VisionEncoderStub(channel).Info(vision_pb2.InfoRequest())).batching


async def measure(model: Path, args: argparse.Namespace) -> dict[tuple[str, int, str], Outcome]:
    """One server process per mode, all loaded at once; every cell runs the modes back to back."""
    servers = {mode: vision_process(model, mode, args) for mode in MODES}
    results: dict[tuple[str, int, str], Outcome] = {}
    try:
        for server in servers.values():
            server.start()
        for server in servers.values():
            await asyncio.to_thread(server.wait_serving, 600)
        for name, requests in workloads().items():
            for clients in args.levels:
                total = max(args.min_requests, clients * args.rounds)
                for _ in range(args.repeats):  # modes interleaved; the best run of each is kept
                    for mode in MODES:
                        before = await batching_stats(servers[mode].address)
                        seconds, tiles, latencies = await drive(servers[mode].address, requests, clients, total)
                        after = await batching_stats(servers[mode].address)
                        avg_batch = (after.tiles_encoded - before.tiles_encoded) / max(after.forwards - before.forwards, 1)
                        outcome = Outcome(tiles / seconds, statistics.median(latencies) * 1000, avg_batch)
                        print(f"{name:7s} clients={clients:2d} batching {mode:10s}: {outcome.tiles_per_s:7.2f} tiles/s, "
                              f"p50 {outcome.p50_ms:8.1f} ms, avg batch {avg_batch:.1f}", flush=True)
                        kept = results.get((name, clients, mode))
                        if kept is None or outcome.tiles_per_s > kept.tiles_per_s:
                            results[(name, clients, mode)] = outcome
    finally:
        for server in servers.values():
            server.stop()
    return results


def report(spec: TinySpec, args: argparse.Namespace, results: dict, seconds: float) -> str:
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{cpu_model()}, {os.cpu_count()} cores"
    lines = [
        "",
        HEADING,
        "",
        f"- {utc_now()}, {device}, {args.threads or torch.get_num_threads()} torch threads, "
        f"{versions('torch', 'grpc')}",
        f"- encoder: random InternViT ({spec.vision}) hidden {spec.vision_hidden}, {spec.vision_layers} layers, "
        f"{spec.vision_heads} heads, MLP {spec.vision_intermediate}, {spec.image_size} px tiles, "
        f"{spec.tokens_per_tile} tokens/tile, LLM hidden {spec.llm_hidden}; {args.dtype} on {args.device}",
        f"- modes side by side: one `python -m ivl_vision` process each, loaded at once, cells run back to back; "
        f"clients in the bench process. off = one request per "
        f"forward; on = tile budget {args.max_batch_tiles}, wait 0 ms (batch whatever queued during the last "
        f"forward) or wait {args.wait_ms:g} ms; {args.preprocess_workers} preprocessing threads",
        f"- each cell: max({args.min_requests}, clients x {args.rounds}) EncodeImages calls over one channel; "
        f"1-tile = 64x64 PNG at max_tiles 1, mixed = 6 sizes at max_tiles 6 (1-7 tiles); best of {args.repeats} "
        f"interleaved runs per cell (the CPUs are shared); run took {seconds:.0f} s",
        f"- command: {command_line('bench_vision_batching.py', args.argv)}",
        "",
    ]
    rows = []
    for name, clients in sorted({(name, clients) for name, clients, _ in results}):
        off, zero, wait = (results[(name, clients, mode)] for mode in MODES)
        best = max(zero.tiles_per_s, wait.tiles_per_s) / off.tiles_per_s
        rows.append((name, clients, f"{off.tiles_per_s:.2f}", f"{zero.tiles_per_s:.2f}", f"{wait.tiles_per_s:.2f}",
                     f"{best:.2f}x", f"{off.p50_ms:.0f}", f"{zero.p50_ms:.0f}", f"{wait.p50_ms:.0f}",
                     f"{zero.avg_batch:.1f} / {wait.avg_batch:.1f}"))
    lines += markdown_table(["workload", "clients", "off tiles/s", "on (wait 0) tiles/s", "on (wait N) tiles/s",
                             "best on/off", "off p50 ms", "wait 0 p50 ms", "wait N p50 ms",
                             "avg batch (wait 0 / N)"], rows)
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per cell")
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell and mode; the best is kept")
    parser.add_argument("--vision-hidden", type=int, default=256)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--max-batch-tiles", type=int, default=32)
    parser.add_argument("--wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--quick", action="store_true", help="levels 1,4 and a smaller encoder (smoke run)")
    parser.add_argument("--preprocess-workers", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS, help="the markdown file to append to")
    parser.add_argument("--no-append", action="store_true", help="print the table, do not touch RESULTS.md")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.levels, args.vision_hidden, args.vision_layers, args.min_requests, args.repeats = [1, 4], 64, 2, 4, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = TinySpec(
        vision_hidden=args.vision_hidden, vision_heads=max(1, args.vision_hidden // 64),
        vision_intermediate=4 * args.vision_hidden, vision_layers=args.vision_layers, image_size=args.image_size,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ivl-bench-vision-") as tmp:
        model = write_tiny_checkpoint(Path(tmp) / "ckpt", spec)
        results = asyncio.run(measure(model, args))
    table = report(spec, args, results, time.perf_counter() - started)
    publish(table, append=not args.no_append, path=args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
