"""Image preprocessing speed: ours vs the reference-style pipeline vs transformers' GotOcr2 vs the floor.

Every method starts from the encoded bytes and ends with normalised float32 tiles:
- ours:      ivl_vision.preprocess.preprocess_trusted (decode, one resize, LUT gather), in-process;
- reference: Image.open(...).convert('RGB') + tests/vision/reference_tiling.py (PIL resize, PIL crop
             per tile, torch ToTensor + Normalize, torch.stack), i.e. the InternVL model-card code;
- GotOcr2:   transformers' GotOcr2 image processor, PIL backend (the torchvision one cannot import
             here), crop_to_patches=True, ImageNet mean/std, max_patches = max tiles;
- floor:     decode (+ convert to RGB only if needed) + the one grid resize alone: the least any
             exact method must do (it leaves out the thumbnail resize and the normalisation).
Images (synthetic, fixed seeds): a photo-like 3840x2160 JPEG, a screenshot-like 1920x1080 PNG and a
tall 1700x8000 scan PNG; max_tiles 6, 12 and 40. torch runs on 1 thread (like our numpy path). Methods take turns; the
table gives images/s per core from thread CPU time (robust on a shared machine) and the wall ratio.
`--pool` also measures throughput (8 images in flight, max_tiles 12) of the service's way to run it, the
sandboxed decode workers (header probe + decode + tile in worker processes, pixels back through a pipe;
bit-exact check included), against the in-process thread pool the service used before them, at 1 and
2 workers, interleaved round by round.

    .venv/bin/python bench/bench_preprocess.py              # ~2-3 min, appends to bench/RESULTS.md
    .venv/bin/python bench/bench_preprocess.py --pool       # plus sandbox vs thread pool throughput
    .venv/bin/python bench/bench_preprocess.py --quick --no-append
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import transformers
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
from ivl_vision.image_io import ImageLimits
from ivl_vision.preprocess import Preprocessor, SandboxLimits, preprocess_trusted
from ivl_vision.tiling import IMAGENET_MEAN, IMAGENET_STD, TilingConfig, plan_tiles
from PIL import Image, ImageDraw

add_paths("tests/vision")
from reference_tiling import reference_pixels  # noqa: E402

HEADING = "## Image preprocessing: ours vs reference vs GotOcr2 (bench/bench_preprocess.py)"


def photo_jpeg(width: int = 3840, height: int = 2160) -> bytes:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([90 + 60 * y / height, 140 + 40 * y / height, 220 - 80 * y / height], axis=-1)
    hills = (np.sin(x / 300.0) * 120 + height * 0.6 < y)[..., None] * np.array([-40, 10, -120], np.float32)
    noise = rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(sky + hills + noise, 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _text_lines(draw: ImageDraw.ImageDraw, rng: np.random.Generator, box: tuple[int, int, int, int]) -> None:
    left, top, right, bottom = box
    for line_top in range(top, bottom - 14, 22):
        x = left
        while x < right - 40:
            word = int(rng.integers(12, 70))
            draw.rectangle((x, line_top, x + word, line_top + 11), fill=(20, 20, 20))
            x += word + 8


def screenshot_png(width: int = 1920, height: int = 1080) -> bytes:
    rng = np.random.default_rng(2)
    image = Image.new("RGB", (width, height), (245, 246, 248))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width, 56), fill=(36, 41, 47))
    draw.rectangle((0, 56, 280, height), fill=(230, 232, 236))
    for i in range(8):
        draw.rounded_rectangle((330 + i * 190, 90, 500 + i * 190, 130), 8, fill=(9, 105, 218))
    _text_lines(draw, rng, (330, 170, width - 60, height - 40))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def scan_png(width: int = 1700, height: int = 8000) -> bytes:
    rng = np.random.default_rng(3)
    image = Image.new("RGB", (width, height), (252, 251, 247))
    _text_lines(ImageDraw.Draw(image), rng, (120, 150, width - 120, height - 150))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def interleaved(
    runs: dict[str, Callable[[], object]], min_time: float, min_runs: int
) -> dict[str, tuple[float, float]]:
    """{method: (median process-CPU seconds, median wall seconds)} per call.

    The methods take turns (one call each per round) so that load from other processes on a shared
    machine hits them alike; CPU time of the process (all threads: the banded methods use several, torch
    has one) measures the work itself, wall time what a caller waits.
    """
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    started = time.perf_counter()
    while len(cpu["ours"]) < min_runs or time.perf_counter() - started < min_time * len(runs):
        for name, run in runs.items():
            begin_cpu, begin_wall = time.process_time(), time.perf_counter()
            run()
            cpu[name].append(time.process_time() - begin_cpu)
            wall[name].append(time.perf_counter() - begin_wall)
    return {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in runs}


def methods(data: bytes, max_tiles: int, tile_threads: dict[int, ThreadPoolExecutor]) -> dict[str, Callable[[], object]]:
    config = TilingConfig(max_tiles=max_tiles)
    got_ocr2 = transformers.GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
        size={"height": 448, "width": 448},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )

    def decoded() -> Image.Image:
        return Image.open(io.BytesIO(data)).convert("RGB")

    def floor() -> object:
        image = Image.open(io.BytesIO(data))
        image = image if image.mode == "RGB" else image.convert("RGB")  # no copy for RGB
        plan = plan_tiles(image.width, image.height, config)
        return image.resize((plan.resize_width, plan.resize_height), Image.Resampling.BICUBIC)

    threaded = {
        f"ours x{n}": (lambda n=n, pool=pool: preprocess_trusted(data, config, ImageLimits(), executor=pool,
                                                                threads=n).pixels)
        for n, pool in tile_threads.items()
    }
    pillow = {
        f"Pillow{suffix}": (lambda n=n, pool=pool: preprocess_trusted(data, config, ImageLimits(), executor=pool,
                                                                    threads=n, kernel=False).pixels)
        for suffix, n, pool in [("", 1, None), *((f" x{n}", n, pool) for n, pool in tile_threads.items())]
    }
    return {
        "ours": lambda: preprocess_trusted(data, config, ImageLimits()).pixels,
        **threaded,
        **pillow,
        "reference": lambda: reference_pixels(decoded(), 1, max_tiles).numpy(),
        "GotOcr2": lambda: got_ocr2(images=decoded(), return_tensors="np")["pixel_values"],
        "floor": floor,
    }


def _process_cpu_s(pids: list[int]) -> float:
    """CPU seconds of this process (all threads) plus the given child processes (from /proc)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def _thread_pool_rate(
    executor: ThreadPoolExecutor, data: bytes, config: TilingConfig, count: int
) -> tuple[float, float]:
    """Before the sandbox: decode + tile in-process on a thread pool (what the service did).
    (images/s, CPU seconds per image)."""
    loop = asyncio.get_running_loop()
    cpu, started = _process_cpu_s([]), time.perf_counter()
    await asyncio.gather(*(loop.run_in_executor(executor, preprocess_trusted, data, config, ImageLimits())
                           for _ in range(count)))
    return count / (time.perf_counter() - started), (_process_cpu_s([]) - cpu) / count


async def _sandbox_rate(
    preprocessor: Preprocessor, data: bytes, config: TilingConfig, count: int
) -> tuple[float, float]:
    """The service now: a header probe and a decode + tile per image, in the sandboxed workers.
    (images/s, CPU seconds per image: the workers' and this process's)."""

    async def one() -> object:
        return await preprocessor.tile(data, config, await preprocessor.probe(data))

    pids = preprocessor.pool.pids
    cpu, started = _process_cpu_s(pids), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return count / (time.perf_counter() - started), (_process_cpu_s(pids) - cpu) / count


def pool_throughput(data: bytes, config: TilingConfig, count: int, rounds: int, worker_counts: list[int],
                    tile_threads: int) -> dict[tuple, tuple[float, float]]:
    """{(kind, workers[, threads]): (median images/s, median CPU s per image)}, interleaved: the in-process thread
    pool (the service before the sandbox), and the sandbox with 1 and `tile_threads` resize threads per worker, for
    each worker count."""
    thread_counts = sorted({1, tile_threads})

    async def run() -> dict[tuple, tuple[float, float]]:
        rates: dict[tuple, list[tuple[float, float]]] = {}
        pools = {workers: ThreadPoolExecutor(max_workers=workers) for workers in worker_counts}
        sandboxes = {(workers, threads): Preprocessor(ImageLimits(), sandbox=SandboxLimits(workers=workers, threads=threads))
                     for workers in worker_counts for threads in thread_counts}
        for sandbox in sandboxes.values():
            await sandbox.start()
        try:
            expected = preprocess_trusted(data, config, ImageLimits()).pixels
            for check in sandboxes.values():
                sandboxed = await check.tile(data, config, await check.probe(data))
                assert np.array_equal(sandboxed.pixels, expected)
            for workers in worker_counts:  # warm-up
                await _thread_pool_rate(pools[workers], data, config, workers)
            for _ in range(rounds):
                for workers in worker_counts:
                    rates.setdefault(("threads", workers), []).append(
                        await _thread_pool_rate(pools[workers], data, config, count))
                    for threads in thread_counts:
                        rates.setdefault(("sandbox", workers, threads), []).append(
                            await _sandbox_rate(sandboxes[workers, threads], data, config, count))
        finally:
            for sandbox in sandboxes.values():
                await sandbox.close()
            for pool in pools.values():
                pool.shutdown()
        return {key: (statistics.median(v[0] for v in values), statistics.median(v[1] for v in values))
                for key, values in rates.items()}

    return asyncio.run(run())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tiles", type=lambda s: [int(x) for x in s.split(",")], default=[6, 12, 40])
    parser.add_argument("--min-time", type=float, default=0.6, help="seconds per method and measurement")
    parser.add_argument("--min-runs", type=int, default=3)
    parser.add_argument("--pool", "--threads", action="store_true", dest="pool",
                        help="also measure throughput: sandboxed workers vs the in-process thread pool, 1 and 2 workers")
    parser.add_argument("--pool-rounds", type=int, default=3)
    parser.add_argument("--pool-workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                        help="decode worker counts of --pool")
    parser.add_argument("--tile-threads", type=lambda s: [int(x) for x in s.split(",")], default=[2],
                        help="also time ours with its resizes in bands on N threads (IVL_VISION_DECODE_THREADS)")
    parser.add_argument("--quick", action="store_true", help="max_tiles 12 only, short measurements")
    parser.add_argument("--no-append", action="store_true", help="print the table, do not touch RESULTS.md")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.max_tiles, args.min_time, args.min_runs = [12], 0.2, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    load_start = load_average()
    images = {
        "photo 3840x2160 JPEG": photo_jpeg(),
        "screenshot 1920x1080 PNG": screenshot_png(),
        "scan 1700x8000 PNG": scan_png(),
    }
    rows = []
    pool_rows = []
    tile_pools = {n: ThreadPoolExecutor(max_workers=n) for n in args.tile_threads}
    for name, data in images.items():
        for max_tiles in args.max_tiles:
            runs = methods(data, max_tiles, tile_pools)
            ours, reference = runs["ours"](), runs["reference"]()
            assert isinstance(ours, np.ndarray) and isinstance(reference, np.ndarray)
            for n in args.tile_threads:  # the banded paths and Pillow's resize must give the same pixels
                assert np.array_equal(runs[f"ours x{n}"](), ours)
                assert np.array_equal(runs[f"Pillow x{n}"](), ours)
            assert np.array_equal(runs["Pillow"](), ours)
            got = runs["GotOcr2"]()
            got_diff = float(np.abs(got - ours).max()) if got.shape == ours.shape else float("nan")
            seconds = interleaved(runs, args.min_time, args.min_runs)
            rows.append((name, max_tiles, ours.shape[0], seconds, bool(np.array_equal(ours, reference)), got_diff))
            print(rows[-1], flush=True)
        if args.pool:
            pool_rows.append((name, pool_throughput(data, TilingConfig(max_tiles=12), 8, args.pool_rounds,
                                                    args.pool_workers, max(args.tile_threads))))
            print(pool_rows[-1], flush=True)
    table = report(rows, pool_rows, args, time.perf_counter() - started, load_start)
    publish(table, append=not args.no_append)
    return 0


def report(rows: list, pool_rows: list, args: argparse.Namespace, elapsed: float, load_start: float) -> str:
    threads = [f"ours x{n}" for n in args.tile_threads]
    pillow = ["Pillow", *(f"Pillow x{n}" for n in args.tile_threads)]
    lines = [
        "",
        HEADING,
        "",
        f"- {utc_now()}; {machine_line(load_start)}; {versions('numpy', 'PIL', 'torch', 'transformers')} "
        "(torch on 1 thread)",
        f"- command: {command_line('bench_preprocess.py', args.argv)} ({elapsed:.0f} s)",
        "- from encoded bytes to float32 tiles; methods interleaved, medians. Wall ms = what one image takes; "
        "images/s per core = 1 / process CPU seconds per image; `ours xN` = our resizes and gathers in bands on N "
        "threads (IVL_VISION_DECODE_THREADS), checked np.array_equal to ours; ours resizes with the exact C kernel "
        "(ivl_vision.exact_resize) and `Pillow[ xN]` is the same code with Pillow's own resize instead "
        "(ivl_vision.banded_resize on N threads; what ours was before the kernel), checked equal; `= ref`: ours "
        "np.array_equal the reference; `GotOcr2 diff`: max |GotOcr2 - ours| (nan: different tile count). On a shared "
        "machine the wall ratios need free cores: threads beyond the idle cores only queue.",
        "",
    ]
    cells = []
    for name, max_tiles, tiles, s, equal, got_diff in rows:
        cpu = {method: value[0] for method, value in s.items()}
        wall = {method: value[1] * 1000 for method, value in s.items()}
        cells.append((name, max_tiles, tiles, f"{wall['reference']:.0f}", f"{wall['ours']:.0f}",
                      *(f"{wall[t]:.0f}" for t in threads), *(f"{wall[t]:.0f}" for t in pillow),
                      f"{wall['reference'] / wall['ours']:.2f}", *(f"**{wall['reference'] / wall[t]:.2f}**" for t in threads),
                      *(f"{wall['reference'] / wall[t]:.2f}" for t in pillow),
                      f"{1 / cpu['ours']:.2f}", f"{1 / cpu['reference']:.2f}", f"{1 / cpu['GotOcr2']:.2f}",
                      f"{1 / cpu['floor']:.2f}", *(f"{1 / cpu[t]:.2f}" for t in threads),
                      "yes" if equal else "NO", f"{got_diff:.2g}"))
    lines += markdown_table(
        ["image", "max_tiles", "tiles", "reference wall ms", "ours wall ms", *(f"{t} wall ms" for t in threads),
         *(f"{t} wall ms" for t in pillow), "ref / ours (wall)", *(f"ref / {t} (wall)" for t in threads),
         *(f"ref / {t} (wall)" for t in pillow), "ours img/s per core", "reference per core",
         "GotOcr2 (PIL) per core", "floor (decode+resize) per core", *(f"{t} per core" for t in threads), "= ref",
         "GotOcr2 diff"], cells)
    if pool_rows:
        counts = args.pool_workers
        extra = max(args.tile_threads)
        headers = ["image"]
        for w in counts:
            headers += [f"thread pool, {w}", f"sandbox {w}x1", f"sandbox {w}x{extra}"]
        headers += [f"sandbox {counts[-1]} / {counts[0]} workers (x1)", "CPU ms/image threads",
                    "CPU ms/image sandbox"]
        body = []
        for name, r in pool_rows:
            row = [name]
            for w in counts:
                row += [f"{r['threads', w][0]:.2f}", f"{r['sandbox', w, 1][0]:.2f}", f"{r['sandbox', w, extra][0]:.2f}"]
            row.append(f"{r['sandbox', counts[-1], 1][0] / r['sandbox', counts[0], 1][0]:.2f}")
            row += [f"{1000 * r['threads', counts[0]][1]:.0f}", f"{1000 * r['sandbox', counts[0], 1][1]:.0f}"]
            body.append(row)
        lines += [
            "",
            "Throughput, 8 images at max_tiles 12 in flight, wall images/s (medians of "
            f"{args.pool_rounds} interleaved rounds; pixels of every sandbox checked np.array_equal to in-process): "
            "`thread pool, W` = decode + tile in-process on W threads (the service before the sandbox), `sandbox WxT` = "
            "header probe + decode + tile in W sandboxed worker processes with T resize threads each (the service "
            "now). Throughput scales with workers while there are free cores (each image's work is the same); on a "
            "shared 2-core machine read the ratios within a row.",
            "",
            *markdown_table(headers, body),
            "",
            f"CPU ms/image ({counts[0]} worker{'s' if counts[0] > 1 else ''}, 1 resize thread): every CPU second this "
            "process and the decode workers spent, per image (robust to other load; 10 ms resolution for the workers).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
