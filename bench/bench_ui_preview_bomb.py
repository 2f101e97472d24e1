"""The UI's event loop (it serves every open tab) while a tab attaches a decode-time bomb: a progressive
JPEG whose scans repeat thousands of times (tests/support/hostile_images.py progressive_jpeg_bomb). Side by side in one run:

- inline: the preview decoded and drawn on the event loop, as the UI did before (tile_preview.preview);
- pool: ivl_frontend.previews.Previews with the JPEG scan check off (the bomb really is decoded, in a
  preview thread, given up after the render timeout);
- pool + header check: the defaults (refused from its scan count before decoding).

For each: the longest the event loop could not run (a 10 ms ticker's worst gap) and the time until
the caption is ready. Appends a table to bench/RESULTS.md.

Run: .venv/bin/python bench/bench_ui_preview_bomb.py [--repeats 1500] [--no-append]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

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

add_paths("tests", "frontend", "proto")
from ivl_frontend.previews import Previews  # noqa: E402
from ivl_frontend.settings import FrontendSettings  # noqa: E402
from ivl_frontend.tile_preview import draw_grid  # noqa: E402
from ivl_proto.common.v1 import common_pb2  # noqa: E402
from PIL import Image  # noqa: E402
from support.hostile_images import progressive_jpeg_bomb  # noqa: E402

PLAN = common_pb2.ImagePlan(grid_cols=3, grid_rows=3, num_tiles=10, has_thumbnail=True)


async def worst_stall(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(the event loop's longest gap while `work` ran, seconds `work` took)."""
    stop = asyncio.Event()
    gaps: list[float] = []

    async def ticker() -> None:
        while not stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.01)
            gaps.append(time.monotonic() - before - 0.01)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await work()
    took = time.monotonic() - started
    stop.set()
    await tick
    return max(gaps), took


async def inline(path: Path) -> object:
    """What the UI did before: open, decode and draw on the event loop."""
    with Image.open(io.BytesIO(path.read_bytes())) as image:
        return draw_grid(image, PLAN)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=1500, help="repeated scans (~8 ms of decoding each at 2048 px)")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="the preview render timeout")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    load_start = load_average()
    with tempfile.TemporaryDirectory() as folder:
        bomb = Path(folder) / "bomb.jpg"
        bomb.write_bytes(progressive_jpeg_bomb(2048, 2048, args.repeats))
        rows = []
        stall, took = await worst_stall(lambda: inline(bomb))
        rows.append(["inline (before)", f"{stall:.2f}", f"{took:.2f}", "picture (after the whole decode)"])
        cases = [
            ("pool, scan check off", {"preview_max_jpeg_scans": 10**6}),
            ("pool + header check (defaults)", {}),
        ]
        for name, overrides in cases:
            settings = FrontendSettings(preview_timeout_s=args.timeout_s, **overrides)
            previews = Previews(settings, root=Path(folder))
            item = None

            async def pooled(previews: Previews = previews) -> None:
                nonlocal item
                item = await previews.item(str(bomb), PLAN, "image 1", "bench")

            stall, took = await worst_stall(pooled)
            assert item is not None
            rows.append([name, f"{stall:.2f}", f"{took:.2f}", item.caption.removeprefix("image 1 · ")])
            while previews.pool.running:  # let a given-up render end before the next case
                await asyncio.sleep(0.1)
            previews.close()
    text = "\n".join([
        "", f"## UI event loop during a decode-time bomb preview ({utc_now()})", "",
        f"{command_line('bench_ui_preview_bomb.py', [f'--repeats {args.repeats}'])}: a 2048x2048 progressive JPEG "
        f"with its luma refinement scan repeated {args.repeats} times ({bomb_size(args.repeats)} KB); "
        f"render timeout {args.timeout_s:g} s; {machine_line(load_start)}; {versions('PIL')}.", "",
        *markdown_table(["preview path", "event loop stalled (s)", "caption after (s)", "result"], rows), "",
    ])
    publish(text + "\n", append=not args.no_append)


def bomb_size(repeats: int) -> int:
    return len(progressive_jpeg_bomb(2048, 2048, repeats)) // 1000


if __name__ == "__main__":
    asyncio.run(main())
