"""GPU check of the vision SERVICE against its bare encoder: does the server keep InternViT-300M busy?

On a GPU machine (run by bench/gpu_all.sh): writes a random InternViT-300M-size checkpoint (ivl_tiny: hidden 1024,
24 layers, 16 heads, MLP 4096, projector to 2048), measures the bare encoder in-process (pixels already on the
device, bf16, batch 16 and 32: the tiles/s a perfect server could reach), then starts `python -m ivl_vision` on it
(bf16 on CUDA; pinned double-buffered host-to-device copies overlapped with the previous forward; batching on,
wait 0, 32 tiles per forward; 8 decode workers) with IVL_VISION_COMPILE off and reduce-overhead (CUDA graphs for
the padded batch shapes), and drives 16 concurrent clients of 1-tile requests (64x64 PNG, max_tiles 1) and of
4K requests (3840x2160 JPEG, max_tiles 12 = 9 tiles). Goal (issue 14): the service >= 90 % of the bare
encoder's tiles/s at 16 clients. Also checks that compiled and eager embeddings agree (min cosine).

    python bench/gpu_service.py                    # on the GPU machine; writes $OUT/gpu_service.md
    python bench/gpu_service.py --device cpu --quick   # smoke test of the script itself
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from benchlib import add_paths, utc_now, versions

add_paths("services/vision_encoder", "proto", "tools/tiny_checkpoint", "tests", "bench")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_vision_ceiling import drive, jpeg, png  # noqa: E402
from ivl_proto.common.v1 import common_pb2  # noqa: E402
from ivl_proto.vision.v1 import vision_pb2  # noqa: E402
from ivl_tiny import TinySpec, write_tiny_checkpoint  # noqa: E402
from ivl_vision.checkpoint import load_vision_encoder  # noqa: E402
from support.redis_server import free_port  # noqa: E402
from support.service_processes import ServiceProcess  # noqa: E402


def bare_tiles_per_s(model: Path, device: str, batch: int, seconds: float) -> float:
    encoder = load_vision_encoder(model, dtype=torch.bfloat16 if device == "cuda" else torch.float32, device=device)
    pixels = torch.randn(batch, 3, 448, 448, device=device, dtype=encoder.dtype)
    for _ in range(3):
        encoder.encode(pixels)
    if device == "cuda":
        torch.cuda.synchronize()
    iterations, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or iterations < 3:
        encoder.encode(pixels)
        iterations += 1
        if device == "cuda":
            torch.cuda.synchronize()
    rate = batch * iterations / (time.perf_counter() - started)
    del encoder, pixels
    if device == "cuda":
        torch.cuda.empty_cache()
    return rate


def service(model: Path, device: str, compile_mode: str) -> ServiceProcess:
    port = free_port()
    env = {
        "PYTHONPATH": os.pathsep.join(str(Path(__file__).resolve().parent.parent / p)
                                      for p in ("proto", "services/vision_encoder")) + os.pathsep
                      + os.environ.get("PYTHONPATH", ""),
        "IVL_VISION_MODEL_PATH": str(model), "IVL_VISION_DEVICE": device,
        "IVL_VISION_DTYPE": "bfloat16" if device == "cuda" else "float32", "IVL_VISION_COMPILE": compile_mode,
        "IVL_VISION_MAX_BATCH_TILES": "32", "IVL_VISION_MAX_QUEUED_TILES": "4096", "IVL_VISION_PREPROCESS_WORKERS": "8",
        "IVL_VISION_DECODE_THREADS": "2", "IVL_VISION_PORT": str(port),
    }
    return ServiceProcess(f"vision-{compile_mode}", "ivl_vision", env, port)


async def embedding_of(address: str, request: vision_pb2.EncodeImagesRequest) -> np.ndarray:
    import grpc
    from ivl_proto.dtypes import bfloat16_bits_to_float32
    from ivl_proto.grpc_runtime import message_size_options
    from ivl_proto.tensor_codec import tensor_from_pb
    from ivl_proto.vision.v1 import vision_pb2_grpc

    async with grpc.aio.insecure_channel(address, options=message_size_options()) as channel:
        response = await vision_pb2_grpc.VisionEncoderStub(channel).EncodeImages(request, timeout=600)
    array = tensor_from_pb(response.images[0].embedding)
    if response.images[0].embedding.dtype == "bfloat16":
        return bfloat16_bits_to_float32(array)
    return array.astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu --quick for a smoke test")
        return 2
    started = time.perf_counter()
    spec = TinySpec(vision_hidden=1024, vision_layers=24, vision_heads=16, vision_intermediate=4096,
                    llm_hidden=2048, llm_heads=16, llm_kv_heads=8, llm_intermediate=256)
    if args.quick:
        spec = TinySpec(vision_hidden=64, vision_layers=2, vision_heads=2, vision_intermediate=128)
    requests = {
        "1-tile": (vision_pb2.EncodeImagesRequest(images=[vision_pb2.ImageInput(data=png(64, 64, 1))],
                                                  tiling=common_pb2.TilingOptions(max_tiles=1)), 8 if args.quick else 512),
        "4K": (vision_pb2.EncodeImagesRequest(images=[vision_pb2.ImageInput(data=jpeg(3840, 2160, 2))],
                                              tiling=common_pb2.TilingOptions(max_tiles=12)), 4 if args.quick else 96),
    }
    lines = [f"## GPU vision service vs its bare encoder ({utc_now()})", "",
             f"device: {torch.cuda.get_device_name(0) if args.device == 'cuda' else 'cpu'}; {versions('torch', 'grpc')}; "
             f"{os.cpu_count()} CPUs; InternViT-300M-size random weights; {args.clients} clients", ""]
    with tempfile.TemporaryDirectory(prefix="ivl-gpu-service-") as tmp:
        model = write_tiny_checkpoint(Path(tmp) / "internvit-300m", spec)
        bare = {batch: bare_tiles_per_s(model, args.device, batch, 0.5 if args.quick else 3.0) for batch in (16, 32)}
        lines.append(f"- bare encoder (encode(), pixels on the device): {bare[16]:.1f} tiles/s at batch 16, "
                     f"{bare[32]:.1f} at batch 32")
        rows, embeddings = [], {}
        for mode in ("off", "reduce-overhead") if args.device == "cuda" else ("off",):
            process = service(model, args.device, mode).start()
            try:
                wait = process.wait_serving(900)
                for workload, (request, total) in requests.items():
                    cell = asyncio.run(drive(process.address, request, args.clients, total, process.pid))
                    rows.append((mode, workload, cell.tiles_per_s, cell.tiles_per_s / bare[32], cell.p50_ms,
                                 cell.cpu_cores_used))
                    print(rows[-1], flush=True)
                embeddings[mode] = asyncio.run(embedding_of(process.address, requests["4K"][0]))
                lines.append(f"- compile {mode}: SERVING after {wait:.0f} s")
            finally:
                process.stop()
    lines += ["", "| IVL_VISION_COMPILE | workload | service tiles/s | / bare (batch 32) | p50 ms | CPU cores busy |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {w} | {t:.1f} | {100 * r:.0f} % | {p:.0f} | {c:.1f} |" for m, w, t, r, p, c in rows]
    if len(embeddings) == 2:
        a, b = embeddings["off"], embeddings["reduce-overhead"]
        cosine = float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)).min())
        lines.append(f"\n- compiled vs eager embeddings of the 4K image: min cosine {cosine:.5f}")
    lines.append(f"\ntotal {time.perf_counter() - started:.0f} s")
    report = "\n".join(lines) + "\n"
    print(report)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "gpu_service.md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
