"""CPU speed of the vision encoder (ivl_vision.encoder.VisionEncoder), fp32, torch threads = --threads.

Measures encode() tiles/s of (a) the tiny checkpoint the tests use (ivl_tiny default spec, loaded from
disk in the original layout, load time included in the report) and (b) a real-size InternViT-300M
(hidden 1024, 24 layers, 16 heads, MLP 4096) + projector to 2048 with random weights (speed does not
depend on the values). The 300M tile takes seconds on 2 cores, so only a few tiles are timed.
Appends a section to bench/RESULTS.md unless --no-append.

    .venv/bin/python bench/bench_encoder_cpu.py
    .venv/bin/python bench/bench_encoder_cpu.py --tiles-300m 1 --no-append
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from benchlib import load_average, machine_line, markdown_table, publish, table_row, utc_now, versions
from ivl_tiny import TinySpec, write_tiny_checkpoint
from ivl_vision.checkpoint import build_random_encoder, load_vision_encoder
from ivl_vision.checkpoint_config import synthetic_config


def tiles_per_second(encoder, batch: int, repeats: int) -> float:
    pixels = torch.randn(batch, 3, 448, 448)
    encoder.encode(pixels[:1])  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        encoder.encode(pixels)
    return batch * repeats / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiles-300m", type=int, default=2, help="tiles timed on the 300M encoder (batch 1 each)")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = write_tiny_checkpoint(Path(scratch) / "tiny", TinySpec(), layout="original")
        started = time.perf_counter()
        tiny = load_vision_encoder(folder)
        load_s = time.perf_counter() - started
        for batch in (1, 8):
            rate = tiles_per_second(tiny, batch, repeats=5)
            rows.append((f"tiny checkpoint (hidden 32, 2 layers), load {load_s * 1000:.0f} ms", batch, f"{rate:.1f}",
                         f"{1000 / rate:.1f}"))
            print(table_row(rows[-1]), flush=True)
    started = time.perf_counter()
    big = build_random_encoder(synthetic_config(1024, 24, 16, 4096, 2048, "300m"))
    build_s = time.perf_counter() - started
    rate = tiles_per_second(big, 1, repeats=args.tiles_300m)
    rows.append((f"InternViT-300M + mlp1 -> 2048, random weights (built in {build_s:.1f} s)", 1, f"{rate:.3f}",
                 f"{1000 / rate:.0f}"))
    print(table_row(rows[-1]), flush=True)
    section = "\n".join([
        "",
        f"## Vision encoder on CPU, fp32 ({utc_now()})",
        "",
        f"`bench/bench_encoder_cpu.py`: {machine_line(load_at_start)} (the CPU is shared with other jobs: "
        f"indicative); {torch.get_num_threads()} torch threads, {versions('torch', 'transformers')}; encode() of "
        "448 px tiles.",
        "",
        *markdown_table(["encoder", "batch", "tiles/s", "ms / tile"], rows),
        "",
    ])
    publish(section, append=not args.no_append)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
