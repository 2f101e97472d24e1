"""This stack vs `transformers serve` (the one-process peer), side by side in one run, same checkpoint, same requests.

Both serve the same native-layout tiny checkpoint (ivl_tiny, which ships the AutoProcessor files) over the
OpenAI chat API, streaming, greedy, 8 new tokens, 1280x720 PNG images (max_tiles 12: 4x2 grid + thumbnail =
9 tiles on both sides: GotOcr2 crop_to_patches = InternVL's tiling):
- ours: redis-server + `python -m ivl_vision` + `python -m ivl_llm` + `python -m ivl_gateway`, one process each,
  `--threads` torch threads per model service (1: the 2 cores split between them; 2: all cores each, what
  torch's default gives here and so how `scripts/run_stack.sh` runs them) and `--omp-wait-policy` (PASSIVE, as
  the launcher sets it, unless told otherwise), the LLM with 4 slots;
- theirs: `transformers serve <checkpoint> --continuous-batching --device cpu` from the benchmark-only venv
  (scripts/setup_bench_venv.sh: torch 2.14.1 + torchvision 0.29.1, which .venv's CPU torch cannot have), torch's
  default threads. transformers 5.23 falls back to sequential generation for image-text models even with
  --continuous-batching (its log says so); that is what a user of it gets.
Measured, alternating between the two servers: TTFT of a new image (median), TTFT of the same image again
(median), a 5-turn chat about one image (total and per turn), and 8 and 32 concurrent clients (half new, half
one of 4 repeated images; every request body is built before the clock starts, so the clients' own PNG and
base64 work neither takes the servers' cores nor stalls the clients' event loop): answered requests/s, TTFT p50
and CPU ms per answered request (CPU seconds of each server's processes and their children: stable on a shared
machine, where the wall-clock rate of either server moves with the neighbours), in --level-rounds rounds with the
two servers back to back in alternating order (medians, and the median of the per-round throughput ratios).
Before anything, the bench venv's AutoProcessor loads the checkpoint and its pixels are checked equal to our
tiling.

    bash scripts/setup_bench_venv.sh && .venv/bin/python bench/bench_vs_transformers_serve.py
    .venv/bin/python bench/bench_vs_transformers_serve.py --quick --no-append
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
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

add_paths("tests")
from support.load_client import ChatOutcome, data_url, run_clients, stream_chat, unique_png  # noqa: E402
from support.redis_server import free_port  # noqa: E402
from support.service_processes import ProcessBackend, child_pids, cpu_seconds  # noqa: E402

HEADING = "## Versus `transformers serve`: same checkpoint, same requests (bench/bench_vs_transformers_serve.py)"
ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 1280, 720
QUESTIONS = ("What is in this picture?", "What colours do you see?", "Is there any text?", "Describe the top left.",
             "Summarise in one word.")

AUTOPROCESSOR_CHECK = r"""
import io, sys, json
import numpy as np
from PIL import Image
from transformers import AutoProcessor
processor = AutoProcessor.from_pretrained(sys.argv[1])
rng = np.random.default_rng(0)
buffer = io.BytesIO()
Image.fromarray(rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)).save(buffer, "PNG")
out = processor(images=[Image.open(buffer)], text=["<IMG_CONTEXT>\nhi"], return_tensors="np")
np.save(sys.argv[2], out["pixel_values"])
print(json.dumps({"class": type(processor).__name__, "image_processor": type(processor.image_processor).__name__,
                  "tokens": int(out["input_ids"].shape[1])}))
"""


def body(messages: list[dict], model: str, max_tokens: int) -> dict:
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}


def user(text: str, image: bytes | None = None) -> dict:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": data_url(image)}}] if image else []
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


class Server:
    def __init__(self, name: str, url: str, model: str, pids: tuple[int, ...] = ()) -> None:
        self.name, self.url, self.model = name, url, model
        self.pids = pids  # the server's processes: CPU seconds of these and their children are its work

    def cpu_s(self) -> float:
        total = 0.0
        for pid in self.pids:
            for member in (pid, *child_pids(pid)):
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    total += cpu_seconds(member)
        return total

    async def chat(self, messages: list[dict], max_tokens: int) -> ChatOutcome:
        async with httpx.AsyncClient(timeout=600) as client:
            outcome = await stream_chat(client, self.url, body(messages, self.model, max_tokens))
        if not outcome.ok:
            raise RuntimeError(f"{self.name}: {outcome.status} {outcome.error_code} {outcome.error_message}")
        return outcome


@contextlib.contextmanager
def transformers_serve(model: Path, venv: Path):
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="tf-serve-", suffix=".log")[1])
    # its /v1/models scans the hub cache and answers 500 when that folder does not exist (a fresh machine)
    hub_cache = model.parent / "hf-hub"  # inside the run's temporary folder: removed with it
    hub_cache.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_CACHE": str(hub_cache)}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(venv / "bin" / "transformers"), "serve", str(model), "--continuous-batching", "--device", "cpu",
             "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise TimeoutError("transformers serve did not answer /v1/models within 300 s")
        yield Server("transformers serve", f"http://127.0.0.1:{port}", str(model), (process.pid,)), process, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def check_autoprocessor(model: Path, venv: Path, tmp: Path) -> str:
    """The bench venv's AutoProcessor loads the checkpoint; its pixel_values equal our tiling."""
    import io

    import numpy as np
    from ivl_vision.image_io import ImageLimits
    from ivl_vision.preprocess import preprocess_trusted
    from ivl_vision.tiling import TilingConfig
    from PIL import Image

    out = tmp / "pixels.npy"
    result = subprocess.run([str(venv / "bin" / "python"), "-c", AUTOPROCESSOR_CHECK, str(model), str(out)],
                            check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)).save(buffer, "PNG")
    ours = preprocess_trusted(buffer.getvalue(), TilingConfig(max_tiles=12), ImageLimits()).pixels
    theirs = np.load(out)
    diff = float(np.abs(theirs - ours).max()) if theirs.shape == ours.shape else float("nan")
    return f"{result}; pixel_values {theirs.shape} vs ours {ours.shape}, max |diff| {diff:.3g}"


async def new_and_repeated(servers: list[Server], rounds: int, max_tokens: int) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = {s.name: {"new": [], "repeated": []} for s in servers}
    for i in range(rounds):
        image = unique_png(900_000 + i, WIDTH, HEIGHT)
        for server in servers:
            out[server.name]["new"].append((await server.chat([user(QUESTIONS[0], image)], max_tokens)).ttft_s or 0)
        for server in servers:
            out[server.name]["repeated"].append((await server.chat([user(QUESTIONS[1], image)], max_tokens)).ttft_s or 0)
    return out


async def five_turns(server: Server, seed: int, max_tokens: int) -> list[float]:
    image = unique_png(seed, WIDTH, HEIGHT)
    messages: list[dict] = []
    times = []
    for turn, question in enumerate(QUESTIONS):
        messages.append(user(question, image if turn == 0 else None))
        outcome = await server.chat(messages, max_tokens)
        times.append(outcome.total_s)
        messages.append({"role": "assistant", "content": outcome.text})
    return times


def single_client(servers: list[Server], rounds: int, max_tokens: int) -> tuple[dict, dict[str, list[float]]]:
    """A warm-up (first requests load lazily built state), then new/repeated image TTFT alternating between the
    servers, then a 5-turn chat on each."""
    for server in servers:
        for i in range(2):
            asyncio.run(server.chat([user("hi", unique_png(800_000 + i, WIDTH, HEIGHT))], max_tokens))
    single = asyncio.run(new_and_repeated(servers, rounds, max_tokens))
    chats = {s.name: asyncio.run(five_turns(s, 700_000 + k, max_tokens)) for k, s in enumerate(servers)}
    return single, chats


@dataclass(frozen=True)
class Level:
    """One server's run of one concurrency level."""

    rps: float  # answered requests per wall second
    ttft_p50_ms: float
    errors: int
    cpu_ms: float  # CPU milliseconds of the server's processes per answered request


async def concurrent(server: Server, clients: int, per_client: int, seed: int, max_tokens: int,
                     repeated: list[bytes]) -> Level:
    total = clients * per_client
    # Every request body is built before the clock starts: encoding a new 1280x720 PNG and its base64 takes the
    # client ~60 ms of CPU, on the cores the servers share, and blocks the clients' event loop while it runs.
    bodies = [body([user(f"Question {i}: what is in it?",
                         unique_png(seed + i, WIDTH, HEIGHT) if i % 2 == 0 else repeated[i % len(repeated)])],
                   server.model, max_tokens) for i in range(total)]
    started, cpu_start = time.perf_counter(), server.cpu_s()
    outcomes = await run_clients(server.url, clients, total, bodies.__getitem__, timeout_s=900)
    seconds, cpu = time.perf_counter() - started, server.cpu_s() - cpu_start
    ok = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed[:3]:  # what went wrong, in the run's output
        print(f"{server.name}, {clients} clients: request failed: HTTP {outcome.status} {outcome.error_code!r} "
              f"{outcome.error_message[:300]!r} (final chunk: {outcome.finished})", flush=True)
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    return Level(len(ok) / seconds, statistics.median(ttfts) * 1000 if ttfts else float("nan"), total - len(ok),
                 cpu * 1000 / max(1, len(ok)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".cache" / "bench-venv")
    parser.add_argument("--rounds", type=int, default=5, help="new/repeated image rounds")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--level-rounds", type=int, default=3,
                        help="rounds of each concurrency level, the two servers back to back in alternating order")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each model service (the launcher leaves torch's default: the cores)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY of our model services (the launcher's default: PASSIVE; 'default' = "
                             "OpenMP's own); transformers serve runs with OpenMP's default, as its users run it")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.quick:
        args.rounds, args.levels, args.per_client, args.level_rounds = 2, [8], 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.venv / "bin" / "transformers").exists():
        print(f"no bench venv at {args.venv}: run `bash scripts/setup_bench_venv.sh` first", file=sys.stderr)
        return 2
    from ivl_tiny import TinySpec, write_tiny_checkpoint

    started, load_start = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="ivl-vs-tf-") as tmp_name:
        tmp = Path(tmp_name)
        model = write_tiny_checkpoint(tmp / "ivl-tiny-native", TinySpec(), layout="native")
        processor_check = check_autoprocessor(model, args.venv, tmp)
        print(processor_check, flush=True)
        backend = ProcessBackend(model, llm={"max_concurrency": 4, "max_queue": 256, "torch_threads": args.threads},
                                 vision={"max_queued_tiles": 4096, "torch_threads": args.threads},
                                 model_env={} if args.omp_wait_policy == "default"
                                 else {"OMP_WAIT_POLICY": args.omp_wait_policy})
        backend.start()
        try:
            with transformers_serve(model, args.venv) as (theirs, _process, log):
                served = httpx.get(f"{backend.gateway.http_url}/v1/models", timeout=10).json()["data"][0]["id"]
                ours_pids = (backend.vision.pid, backend.llm.pid, backend.gateway.pid)
                if backend.redis is not None and backend.redis.process is not None:
                    ours_pids += (backend.redis.process.pid,)
                # any other model name is a 404, as OpenAI's
                ours = Server("ours", backend.gateway.http_url, served, ours_pids)
                servers = [ours, theirs]
                single, chats = single_client(servers, args.rounds, args.max_tokens)
                repeated = [unique_png(600_000 + i, WIDTH, HEIGHT) for i in range(4)]
                levels: dict[tuple[str, int], list[Level]] = {}
                for level in args.levels:
                    for round_index in range(args.level_rounds):  # back to back, alternating who goes first
                        order = servers if round_index % 2 == 0 else servers[::-1]
                        for server in order:
                            k = servers.index(server)
                            result = asyncio.run(concurrent(server, level, args.per_client,
                                                            100_000 * (level + k) + 10_000 * round_index,
                                                            args.max_tokens, repeated))
                            levels.setdefault((server.name, level), []).append(result)
                            print(server.name, level, round_index, result, flush=True)
                fallback = "Falling back to sequential generation" in log.read_text(errors="replace")
        finally:
            backend.stop()
    publish(report(single, chats, levels, args, processor_check, fallback, time.perf_counter() - started, load_start),
            append=not args.no_append)
    return 0


def report(single, chats, levels, args, processor_check, fallback, elapsed, load_start) -> str:
    med = {name: {k: statistics.median(v) * 1000 for k, v in d.items()} for name, d in single.items()}
    t = "transformers serve"
    rows = [
        ("TTFT, new image (median ms)", f"{med['ours']['new']:.0f}", f"{med[t]['new']:.0f}",
         f"{med[t]['new'] / med['ours']['new']:.2f}x", "no slower (>= 1.0x)"),
        ("TTFT, same image again (median ms)", f"{med['ours']['repeated']:.0f}", f"{med[t]['repeated']:.0f}",
         f"{med[t]['repeated'] / med['ours']['repeated']:.2f}x", "ahead (> 1.0x)"),
        ("5-turn chat, total s", f"{sum(chats['ours']):.2f}", f"{sum(chats[t]):.2f}",
         f"{sum(chats[t]) / sum(chats['ours']):.2f}x", "ahead (> 1.0x)"),
    ]
    round_lines = []
    for level in args.levels:
        ours_runs, their_runs = levels[("ours", level)], levels[(t, level)]
        ratios = [o.rps / r.rps for o, r in zip(ours_runs, their_runs, strict=True)]

        def cell(runs: list[Level]) -> str:
            return (f"{statistics.median(r.rps for r in runs):.2f} ({statistics.median(r.ttft_p50_ms for r in runs):.0f}; "
                    f"{sum(r.errors for r in runs)}; {statistics.median(r.cpu_ms for r in runs):.0f})")

        work = statistics.median(r.cpu_ms for r in their_runs) / statistics.median(o.cpu_ms for o in ours_runs)
        rows.append((f"{level} clients, answered req/s (TTFT p50 ms; errors; CPU ms per request)", cell(ours_runs),
                     cell(their_runs), f"{statistics.median(ratios):.2f}x (CPU per request {work:.2f}x)",
                     ">= 1.2x at 8 clients" if level == 8 else "ahead (> 1.0x)"))
        round_lines.append(f"- {level} clients, ours / theirs req/s per round (back to back): "
                           + ", ".join(f"{o.rps:.2f} / {r.rps:.2f}" for o, r in zip(ours_runs, their_runs, strict=True)))
    lines = [
        "", HEADING, "",
        f"- {utc_now()}; {machine_line(load_start)}; {versions('torch', 'transformers', 'grpc')} (ours); transformers "
        "serve in the bench venv (torch 2.14.1, torchvision 0.29.1)",
        f"- command: {command_line('bench_vs_transformers_serve.py', args.argv)} ({elapsed:.0f} s)",
        f"- ours: {args.threads} torch thread(s) per model service, OMP_WAIT_POLICY {args.omp_wait_policy}; "
        f"ivl_tiny default spec, native layout, fp32 CPU; {WIDTH}x{HEIGHT} PNG = 9 tiles; greedy, {args.max_tokens} new "
        f"tokens; new/repeated: {args.rounds} rounds; concurrency: {args.per_client} requests per client, half new images, "
        f"every body built before the clock starts; {args.level_rounds} rounds per level, the servers back to back in "
        "alternating order: the medians, and the median of the per-round ratios; CPU ms per request = CPU seconds "
        "of the server's processes and their children (ours: redis, vision + decode workers, LLM, gateway) per "
        "answered request, which a noisy neighbour does not inflate",
        f"- AutoProcessor in the bench venv: {processor_check}",
        f"- transformers serve fell back to sequential generation (continuous batching is text-only there): {fallback}",
        "- 5-turn chat per turn s: ours " + " / ".join(f"{x:.2f}" for x in chats["ours"]) + "; transformers serve "
        + " / ".join(f"{x:.2f}" for x in chats[t]),
        *round_lines,
        "",
        *markdown_table(["measurement", "ours", "transformers serve", "ours ahead by", "goal"], rows),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
