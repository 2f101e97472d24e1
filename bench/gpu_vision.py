"""GPU checks of the vision encoder: throughput of real-size InternViT-300M / -6B, and bf16 GPU vs fp32 CPU.

One script for a GPU machine (torch + transformers, no internet, no lmdeploy, no generated stubs):

    PYTHONPATH=services/vision_encoder:proto:tools/tiny_checkpoint python bench/gpu_vision.py

(the script also puts those folders on sys.path itself). It builds the encoders with the project's
own classes (ivl_vision.encoder.VisionEncoder) and random weights in bf16 on CUDA:
  - InternViT-300M (hidden 1024, 24 layers, 16 heads, MLP 4096, LayerNorm, qkv bias) + projector to 2048
  - InternViT-6B (hidden 3200, 45 layers, 25 heads, MLP 12800, RMSNorm, qk-norm) + projector to 6144
and times encode() at batch 1, 2, 4, 8, 16, 32 tiles (warm-up, cuda synchronize), reporting tiles/s,
achieved TFLOP/s (matmul + attention FLOPs counted analytically) and the share of the bf16 dense peak.
Correctness: a tiny checkpoint written by ivl_tiny, encoded in bf16 on the GPU vs fp32 on the CPU, and the
300M encoder's bf16 vs fp32 outputs on the GPU. An out-of-memory at any point is reported, not fatal.
Stays under ~4 minutes on an H100 (a time guard skips what would not fit). Prints a markdown report and
writes it to $OUT/gpu_vision.md when OUT is set.

    python bench/gpu_vision.py --device cpu --quick     # smoke test of the script itself, no GPU
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import traceback
from pathlib import Path

from benchlib import add_paths, cpu_model, utc_now, versions

add_paths("services/vision_encoder", "proto", "tools/tiny_checkpoint")
import torch  # noqa: E402
from ivl_vision.checkpoint import build_random_encoder, load_vision_encoder  # noqa: E402
from ivl_vision.checkpoint_config import VisionCheckpointConfig, synthetic_config  # noqa: E402

BATCHES = (1, 2, 4, 8, 16, 32)
TIME_BUDGET_S = 230.0
PEAKS_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0),
                ("L40S", 362.0), ("A10G", 70.0))
MODELS = {
    "InternViT-300M + mlp1 -> 2048": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                                          llm_hidden_size=2048, flavour="300m"),
    "InternViT-6B + mlp1 -> 6144": dict(hidden_size=3200, num_layers=45, num_heads=25, intermediate_size=12800,
                                        llm_hidden_size=6144, flavour="6b"),
}
QUICK_MODELS = {
    "quick 300m-style (256 wide, 2 layers)": dict(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024,
                                                 llm_hidden_size=512, flavour="300m"),
    "quick 6b-style (320 wide, 2 layers)": dict(hidden_size=320, num_layers=2, num_heads=5, intermediate_size=1280,
                                               llm_hidden_size=768, flavour="6b"),
}


def flops_per_tile(config: VisionCheckpointConfig) -> float:
    """Multiply-adds x 2 of one 448 px tile: patch embedding, every tower layer, projector."""
    tower = config.tower
    d, inner = tower.hidden_size, tower.intermediate_size
    side = config.image_size // tower.patch_size
    tokens = side * side + 1
    patch = 2 * side * side * tower.num_channels * tower.patch_size**2 * d
    per_layer = 2 * tokens * (3 * d * d + d * d + 2 * d * inner) + 2 * 2 * tokens * tokens * d
    out_tokens, folded = config.tokens_per_tile, d * round(1 / config.downsample_ratio) ** 2
    projector = 2 * out_tokens * (folded * config.llm_hidden_size + config.llm_hidden_size**2)
    return float(patch + config.layers_to_run * per_layer + projector)


def peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAKS_TFLOPS if key in name), None)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def time_encoder(encoder, batch: int, device: str, dtype: torch.dtype, min_seconds: float,
                 forward=None) -> tuple[float, int]:
    """Seconds per forward of `batch` tiles (median-free: total time / iterations after 2 warm-ups)."""
    pixels = torch.randn(batch, 3, 448, 448, device=device, dtype=dtype)
    forward = forward or encoder.encode
    for _ in range(2):
        forward(pixels)
    sync(device)
    iterations, started = 0, time.perf_counter()
    while True:
        forward(pixels)
        iterations += 1
        sync(device)
        elapsed = time.perf_counter() - started
        if (elapsed >= min_seconds and iterations >= 3) or elapsed >= 4 * min_seconds:
            return elapsed / iterations, iterations


def build(spec: dict, device: str, dtype: torch.dtype):
    config = synthetic_config(**spec)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the parameters directly in the target dtype
    try:
        return build_random_encoder(config, dtype=dtype, device=device), config
    finally:
        torch.set_default_dtype(previous)


def throughput(models: dict, device: str, dtype: torch.dtype, batches: tuple[int, ...], deadline: float,
               min_seconds: float, peak: float | None, compile_mode: str = "off") -> list[str]:
    lines = ["| model | params | batch | ms / forward | tiles/s | TFLOP/s | share of peak |",
             "|---|---|---|---|---|---|---|"]
    for label, spec in models.items():
        if time.perf_counter() > deadline:
            lines.append(f"| {label} | | | skipped: time budget spent | | | |")
            continue
        encoder = None
        try:
            started = time.perf_counter()
            encoder, config = build(spec, device, dtype)
            params = sum(p.numel() for p in encoder.parameters())
            print(f"built {label}: {params / 1e6:.0f} M params in {time.perf_counter() - started:.1f} s", flush=True)
        except Exception as error:
            lines.append(f"| {label} | | | build failed: {'OOM' if is_oom(error) else repr(error)[:120]} | | | |")
            encoder = None
            free_memory(device)
            continue
        per_tile = flops_per_tile(config)
        for batch in batches:
            if time.perf_counter() > deadline:
                lines.append(f"| {label} | | {batch} | skipped: time budget spent | | | |")
                break
            try:
                seconds, iterations = time_encoder(encoder, batch, device, dtype, min_seconds)
            except Exception as error:
                reason = "out of memory" if is_oom(error) else repr(error)[:120]
                lines.append(f"| {label} | {params / 1e6:.0f} M | {batch} | {reason} | | | |")
                free_memory(device)
                break
            lines.append(throughput_row(label, params, batch, seconds, per_tile, peak))
            print(lines[-1], f"({iterations} iterations)", flush=True)
        if compile_mode != "off" and time.perf_counter() < deadline:
            lines += compiled_rows(encoder, label, params, per_tile, batches[-2:], device, dtype, min_seconds, peak,
                                   compile_mode)
        del encoder
        free_memory(device)
    return lines


def throughput_row(label: str, params: int, batch: int, seconds: float, per_tile: float, peak: float | None) -> str:
    """One table row: forward ms, tiles/s, TFLOP/s and its share of the dense peak."""
    tiles_per_s = batch / seconds
    tflops = per_tile * tiles_per_s / 1e12
    share = f"{100 * tflops / peak:.1f} %" if peak else "n/a"
    return (f"| {label} | {params / 1e6:.0f} M | {batch} | {1000 * seconds:.2f} | {tiles_per_s:.1f} | "
            f"{tflops:.1f} | {share} |")


def compiled_rows(encoder, label: str, params: int, per_tile: float, batches, device: str, dtype: torch.dtype,
                  min_seconds: float, peak: float | None, mode: str) -> list[str]:
    """The same forward through torch.compile(mode) (reduce-overhead = CUDA graphs), fixed batch shapes."""
    rows = []
    try:
        compiled = torch.compile(encoder, mode=mode, dynamic=False)
    except Exception as error:
        return [f"| {label} (compile {mode}) | | | compile failed: {repr(error)[:120]} | | | |"]
    for batch in batches:
        try:
            with torch.inference_mode():
                seconds, iterations = time_encoder(encoder, batch, device, dtype, min_seconds, forward=compiled)
        except Exception as error:
            rows.append(f"| {label} (compile {mode}) | | {batch} | {'out of memory' if is_oom(error) else repr(error)[:120]} | | | |")
            free_memory(device)
            break
        rows.append(throughput_row(f"{label} (compile {mode})", params, batch, seconds, per_tile, peak))
        print(rows[-1], f"({iterations} iterations)", flush=True)
    return rows


def compare(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float, float]:
    reference, other = reference.float().cpu(), other.float().cpu()
    max_diff = (reference - other).abs().max().item()
    scale = reference.abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(reference.flatten(1), other.flatten(1), dim=1).min().item()
    return max_diff, max_diff / max(scale, 1e-12), cosine


def correctness(device: str, dtype: torch.dtype, models: dict) -> tuple[list[str], bool]:
    """bf16 on the device vs fp32 on the CPU (tiny checkpoint), and bf16 vs fp32 of a real-width encoder."""
    lines = ["| check | max abs diff | max diff / max abs | min cosine | verdict |", "|---|---|---|---|---|"]
    ok = True
    pixels = torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    try:
        from ivl_tiny import TinySpec, write_tiny_checkpoint

        with tempfile.TemporaryDirectory() as scratch:
            for vision in ("300m", "6b"):
                folder = write_tiny_checkpoint(Path(scratch) / vision, TinySpec(vision=vision), layout="original")
                cpu = load_vision_encoder(folder).encode(pixels)
                for check_dtype in (torch.float32, dtype):
                    gpu = load_vision_encoder(folder, dtype=check_dtype, device=device).encode(pixels.to(device))
                    max_diff, relative, cosine = compare(cpu, gpu)
                    limit = (1e-3, 0.9999) if check_dtype == torch.float32 else (0.05, 0.999)
                    good = relative <= limit[0] and cosine >= limit[1]
                    ok &= good
                    name = str(check_dtype).removeprefix("torch.")
                    lines.append(f"| tiny {vision} checkpoint: {name} on {device} vs float32 on cpu | {max_diff:.2e} | "
                                 f"{relative:.2e} | {cosine:.6f} | {'ok' if good else 'MISMATCH'} |")
    except Exception as error:
        ok = False
        lines.append(f"| tiny checkpoint | | | | failed: {repr(error)[:160]} |")
        traceback.print_exc()
    first_label, first_spec = next(iter(models.items()))
    try:
        encoder, _ = build(first_spec, device, torch.float32)
        fp32 = encoder.encode(pixels.to(device))
        low = encoder.to(dtype)
        low_out = low.encode(pixels.to(device))
        max_diff, relative, cosine = compare(fp32, low_out)
        good = cosine >= 0.99
        ok &= good
        lines.append(f"| {first_label} random weights: {str(dtype).removeprefix('torch.')} vs float32 on {device} | "
                     f"{max_diff:.2e} | {relative:.2e} | {cosine:.6f} | {'ok' if good else 'MISMATCH'} |")
        del encoder, low
    except Exception as error:
        lines.append(f"| {first_label} bf16 vs fp32 | | | | failed: {'OOM' if is_oom(error) else repr(error)[:160]} |")
    free_memory(device)
    return lines, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small models and batches (smoke test of the script)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--compile", default="off", help="also time torch.compile(mode) at the two largest batches")
    args = parser.parse_args()
    started = time.perf_counter()
    deadline = started + TIME_BUDGET_S
    device, dtype = args.device, getattr(torch, args.dtype)
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here; run with --device cpu --quick for a smoke test")
        return 2
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else cpu_model()
    peak = peak_tflops(name) if device.startswith("cuda") and dtype != torch.float32 else None
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks compare against the CPU
        torch.backends.cudnn.allow_tf32 = False
    models = QUICK_MODELS if args.quick else MODELS
    batches = (1, 2, 4) if args.quick else BATCHES
    header = [
        f"## GPU vision encoder ({utc_now()})",
        "",
        f"device: {name}; {versions('torch', 'transformers')}; dtype {args.dtype}; attention sdpa; random weights; "
        f"dense peak used: {f'{peak:.0f} TFLOP/s' if peak else 'n/a'}",
        "",
    ]
    print("\n".join(header), flush=True)
    check_lines, ok = correctness(device, dtype, models)
    print("\n".join(check_lines), flush=True)
    speed_lines = throughput(models, device, dtype, batches, deadline, 0.3 if args.quick else 1.0, peak, args.compile)
    report = "\n".join([*header, "### Correctness", "", *check_lines, "", "### Throughput (encode(), 448 px tiles)", "",
                        *speed_lines, "", f"total {time.perf_counter() - started:.0f} s", ""])
    print(report)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_vision.md").write_text(report)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
