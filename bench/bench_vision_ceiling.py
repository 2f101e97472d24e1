"""Serving-overhead ceiling of the vision service: tiles per CPU second with a no-op encoder.

The service runs for real (gRPC, header probes and decodes in the sandboxed workers, admission, batching,
the encode function's conversions, the response with the embeddings) around an encoder that returns zeros
of the real shape at once (bench/noop_vision_server.py, through `build_server(load=)`). What it serves per
CPU second of its process tree (the server and its decode workers; /proc utime + stime, so the figure holds
on a shared machine) is the CPU-side ceiling: how many tiles one core of a GPU host can feed the encoder.

Workloads: "1-tile" = a 64x64 PNG at max_tiles 1 (the 1-tile requests of bench_vision_batching.py); "4K" = a 3840x2160 JPEG at max_tiles 12 (4x2 grid +
thumbnail = 9 tiles). Each with batching on (wait 0) and off. Embeddings of a 2048-wide LLM in bfloat16
(InternViT-300M + InternLM2-1.8B, Mini-InternVL-Chat-2B-V1-5). Goals (issue 14): >= 150 tiles/s per core
(1-tile), >= 68 (4K): a 16-core host then feeds 2x the bare InternViT-300M's 537 tiles/s on an H100.

`--code DIR[=LABEL]` (repeatable) also runs the service from other checkouts side by side (their stubs
generated with `.venv/bin/python DIR/proto/generate.py`), e.g. the commit before a change:

    git -C . archive 8bb1ffa | tar -x -C /tmp/before && .venv/bin/python /tmp/before/proto/generate.py
    .venv/bin/python bench/bench_vision_ceiling.py --code /tmp/before="before (8bb1ffa)"
    .venv/bin/python bench/bench_vision_ceiling.py --quick --no-append
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
from benchlib import (
    add_paths,
    command_line,
    load_average,
    machine_line,
    markdown_table,
    publish,
    utc_now,
    versions,
)
from ivl_proto.common.v1 import common_pb2
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.vision.v1 import vision_pb2, vision_pb2_grpc
from ivl_tiny import TinySpec, write_tiny_checkpoint
from PIL import Image

add_paths("tests")
from support.redis_server import free_port  # noqa: E402
from support.service_processes import ServiceProcess  # noqa: E402
from vision_load import encode_clients  # noqa: E402

HEADING = "## Vision service ceiling: no-op encoder, tiles per CPU second (bench/bench_vision_ceiling.py)"
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PACKAGES = ("proto", "services/vision_encoder")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def jpeg(width: int, height: int, seed: int) -> bytes:
    """Photo-like content (smooth gradients + noise) so the JPEG decodes at a realistic speed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([60 + 120 * x / width, 80 + 100 * y / height, 200 - 90 * x / width], axis=-1)
    noise = rng.normal(0, 10, (height, width, 3)).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def workloads() -> dict[str, vision_pb2.EncodeImagesRequest]:
    return {
        "1-tile": vision_pb2.EncodeImagesRequest(
            images=[vision_pb2.ImageInput(data=png(64, 64, 1))], tiling=common_pb2.TilingOptions(max_tiles=1)),
        "4K": vision_pb2.EncodeImagesRequest(
            images=[vision_pb2.ImageInput(data=jpeg(3840, 2160, 2))], tiling=common_pb2.TilingOptions(max_tiles=12)),
    }


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its descendants alive now (the decode workers)."""
    total, stack, seen = 0.0, [pid], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
            for task in Path(f"/proc/{current}/task").iterdir():
                stack.extend(int(child) for child in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


@dataclass(frozen=True)
class Cell:
    tiles_per_cpu_s: float
    tiles_per_s: float
    cpu_cores_used: float
    p50_ms: float


async def drive(address: str, request: vision_pb2.EncodeImagesRequest, clients: int, total: int, pid: int) -> Cell:
    async with grpc.aio.insecure_channel(address, options=message_size_options()) as channel:
        stub = vision_pb2_grpc.VisionEncoderStub(channel)
        for _ in range(2):
            await stub.EncodeImages(request, timeout=600)  # warm-up: connection, worker heaps
        cpu_start, started = tree_cpu_seconds(pid), time.perf_counter()
        tiles, latencies = await encode_clients(stub, [request], clients, total)
        wall, cpu = time.perf_counter() - started, tree_cpu_seconds(pid) - cpu_start
    return Cell(tiles / max(cpu, 1e-9), tiles / wall, cpu / wall, statistics.median(latencies) * 1000)


def server(model: Path, code: Path | None, batching: bool, args: argparse.Namespace) -> ServiceProcess:
    roots = [str((code or ROOT) / package) for package in PACKAGES]
    env = {
        "PYTHONPATH": os.pathsep.join([*roots, str(BENCH), os.environ.get("PYTHONPATH", "")]),
        "IVL_VISION_MODEL_PATH": str(model), "IVL_VISION_DTYPE": "bfloat16", "IVL_VISION_DEVICE": "cpu",
        "IVL_VISION_BATCHING": "true" if batching else "false", "IVL_VISION_MAX_QUEUED_TILES": "4096",
        "IVL_VISION_WARMUP": "false", "IVL_VISION_DECODE_WALL_S": "120", "IVL_VISION_TORCH_THREADS": "1",
    }
    if args.workers:
        env["IVL_VISION_PREPROCESS_WORKERS"] = str(args.workers)
    port = free_port()
    label = f"vision-noop-{'on' if batching else 'off'}"
    return ServiceProcess(label, "noop_vision_server", {**env, "IVL_VISION_PORT": str(port)}, port)


def parse_code(value: str) -> tuple[Path, str]:
    path, _, label = value.partition("=")
    return Path(path).resolve(), label or path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", type=parse_code, action="append", default=[],
                        help="DIR[=LABEL]: also run the service from this checkout")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=lambda s: dict(zip(("1-tile", "4K"), map(int, s.split(",")), strict=True)),
                        default={"1-tile": 160, "4K": 24}, help="requests per cell: 1-tile,4K")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best round per cell counts")
    parser.add_argument("--workers", type=int, default=0, help="IVL_VISION_PREPROCESS_WORKERS (default: the service's)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.requests, args.rounds = {"1-tile": 40, "4K": 8}, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, load_start = time.perf_counter(), load_average()
    codes: list[tuple[Path | None, str]] = [*((path, label) for path, label in args.code), (None, args.label)]
    requests = workloads()
    with tempfile.TemporaryDirectory(prefix="ivl-ceiling-") as tmp:
        model = write_tiny_checkpoint(Path(tmp) / "mini-2b-shape", TinySpec(llm_hidden=2048, llm_heads=16,
                                                                           llm_kv_heads=8, llm_intermediate=256))
        servers = {(label, batching): server(model, code, batching, args)
                   for code, label in codes for batching in (True, False)}
        for process in servers.values():
            process.start()
        try:
            for process in servers.values():
                process.wait_serving(120)
            best: dict[tuple[str, bool, str], Cell] = {}
            for _ in range(args.rounds):
                for workload, request in requests.items():
                    for key, process in servers.items():
                        cell = asyncio.run(drive(process.address, request, args.clients, args.requests[workload],
                                                 process.pid))
                        print(key, workload, cell, flush=True)
                        previous = best.get((*key, workload))
                        if previous is None or cell.tiles_per_cpu_s > previous.tiles_per_cpu_s:
                            best[(*key, workload)] = cell
        finally:
            for process in servers.values():
                process.stop()
    publish(report(best, codes, args, time.perf_counter() - started, load_start), append=not args.no_append)
    return 0


def report(best: dict, codes: list, args: argparse.Namespace, elapsed: float, load_start: float) -> str:
    lines = [
        "", HEADING, "",
        f"- {utc_now()}; {machine_line(load_start)}; {versions('numpy', 'PIL', 'torch', 'grpc')}",
        f"- command: {command_line('bench_vision_ceiling.py', args.argv)} ({elapsed:.0f} s)",
        f"- no-op encoder (zeros of (tiles, 256, 2048) bfloat16), CPU device, {args.clients} concurrent clients over "
        "one channel in the bench process; tiles/s per core = tiles / CPU seconds of the service's process tree "
        "(server + decode workers), best of "
        f"{args.rounds} interleaved rounds; wall tiles/s and cores busy shown for reading, not comparable on a "
        "shared machine. Goals: 1-tile >= 150, 4K >= 68 tiles/s per core.",
        "",
    ]
    rows = []
    for workload in ("1-tile", "4K"):
        for _, label in codes:
            for batching in (True, False):
                cell = best[(label, batching, workload)]
                rows.append((workload, label, "on" if batching else "off", f"{cell.tiles_per_cpu_s:.1f}",
                             f"{cell.tiles_per_s:.1f}", f"{cell.cpu_cores_used:.2f}", f"{cell.p50_ms:.0f}"))
    lines += markdown_table(["workload", "code", "batching", "tiles/s per core", "tiles/s (wall)", "cores busy",
                             "p50 ms"], rows)
    if len(codes) > 1:
        base, last = codes[0][1], codes[-1][1]
        ratios = [f"{w} batching {'on' if b else 'off'}: x{best[(last, b, w)].tiles_per_cpu_s / best[(base, b, w)].tiles_per_cpu_s:.2f}"
                  for w in ("1-tile", "4K") for b in (True, False)]
        lines += ["", f"- {last} vs {base}, tiles per CPU second: " + "; ".join(ratios)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
