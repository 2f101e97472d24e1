"""LLM service (ivl_llm), transformers backend on CPU: time to first token and decode tokens/s, called
in-process vs through the gRPC service, side by side in one run (same loaded model, same event loop).

    .venv/bin/python bench/bench_llm.py            # ~3-4 min, appends to bench/RESULTS.md
    .venv/bin/python bench/bench_llm.py --models tiny --no-append

Models: the tiny test checkpoint (ivl_tiny defaults) and ivl_tiny's "qwen2-0.5b" preset (random
weights at Qwen2-0.5B size: 896 hidden, 24 layers, 14 heads / 2 KV heads; InternVL2-1B's LLM), both run
in fp32 with 2 torch threads. Each request: one image (one 448 px tile = 256 embedding rows, random
values) + a short question, greedy, a fixed number of new tokens (the random models rarely stop).
Checkpoints are written once into --cache-dir and reused.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from benchlib import machine_line, markdown_table, publish, utc_now, versions
from ivl_llm.prompt import ImageEmbedding
from ivl_llm.sampling import Sampling
from ivl_llm.server import LLMServer, build_server
from ivl_llm.service import Finished
from ivl_llm.settings import LLMSettings
from ivl_llm.templates import ChatMessage
from ivl_proto.common.v1 import common_pb2
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.llm.v1 import llm_pb2, llm_pb2_grpc
from ivl_proto.tensor_codec import tensor_to_pb

QUESTION = "<image>\nDescribe the image in detail."
MODELS = {"tiny": ("tiny", 32, 30), "qwen2-0.5b": ("qwen2-0.5b", 16, 5)}  # preset, new tokens, repeats


@dataclass
class Run:
    ttft_s: float
    decode_tps: float
    total_s: float
    tokens: int
    cpu_s: float = 0.0  # CPU time of the whole process (all threads) during the request


def checkpoint(cache_dir: Path, preset: str) -> Path:
    from ivl_tiny import spec_from_preset, write_tiny_checkpoint

    folder = cache_dir / f"{preset}-original"
    if not (folder / "config.json").exists():
        started = time.perf_counter()
        write_tiny_checkpoint(folder, spec_from_preset(preset), layout="original")
        print(f"wrote {folder} in {time.perf_counter() - started:.1f} s")
    return folder


class ServerThread:
    """The LLM gRPC server on loopback in its own thread + loop; in-process calls run on that loop too."""

    def __init__(self, settings: LLMSettings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: LLMServer = self.call(self._start(settings)).result()

    def call(self, coroutine: Any) -> Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    async def _start(self, settings: LLMSettings) -> LLMServer:
        server = build_server(settings)
        await server.start()
        await server.wait_ready()
        return server

    def close(self) -> None:
        self.call(self.server.stop(0)).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def timed(started: float, stamps: list[tuple[float, int]], ended: float) -> Run:
    tokens = sum(n for _, n in stamps)
    first, last = stamps[0][0], stamps[-1][0]
    decoded = tokens - stamps[0][1]
    return Run(first - started, decoded / (last - first) if last > first else 0.0, ended - started, tokens)


async def in_process(server: LLMServer, embedding: np.ndarray, new_tokens: int) -> Run:
    stamps: list[tuple[float, int]] = []
    cpu = time.process_time()
    started = time.perf_counter()
    async for event in server.service.generate(
        [ChatMessage("user", QUESTION)], [ImageEmbedding(embedding, "float32")], Sampling(max_new_tokens=new_tokens)
    ):
        if not isinstance(event, Finished):
            stamps.append((time.perf_counter(), event.tokens))
    run = timed(started, stamps, time.perf_counter())
    run.cpu_s = time.process_time() - cpu
    return run


def over_grpc(stub: llm_pb2_grpc.LanguageModelStub, embedding: np.ndarray, new_tokens: int) -> Run:
    request = llm_pb2.GenerateRequest(
        messages=[llm_pb2.Message(role=common_pb2.ROLE_USER, content=QUESTION)],
        image_embeddings=[tensor_to_pb(embedding)],
        sampling=common_pb2.SamplingParams(max_new_tokens=new_tokens),
    )
    stamps: list[tuple[float, int]] = []
    cpu = time.process_time()
    started = time.perf_counter()
    for response in stub.Generate(request, timeout=600):
        if response.HasField("delta"):
            stamps.append((time.perf_counter(), response.delta.tokens))
    run = timed(started, stamps, time.perf_counter())
    run.cpu_s = time.process_time() - cpu
    return run


def request_codec_ms(embedding: np.ndarray, new_tokens: int, repeats: int = 30) -> float:
    """Median ms to build, serialize and parse one GenerateRequest with this embedding (both ends' codec
    work of the hop, without the network and the event loops)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        request = llm_pb2.GenerateRequest(
            messages=[llm_pb2.Message(role=common_pb2.ROLE_USER, content=QUESTION)],
            image_embeddings=[tensor_to_pb(embedding)],
            sampling=common_pb2.SamplingParams(max_new_tokens=new_tokens),
        )
        parsed = llm_pb2.GenerateRequest.FromString(request.SerializeToString())
        np.frombuffer(parsed.image_embeddings[0].data, dtype=np.float32).copy()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def bench_model(name: str, folder: Path, new_tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    settings = LLMSettings(model_path=str(folder), host="127.0.0.1", port=0, dtype="float32", torch_threads=threads)
    started = time.perf_counter()
    server = ServerThread(settings)
    load_s = time.perf_counter() - started
    hidden = server.server.service.checkpoint.hidden_size
    embedding = np.random.default_rng(0).standard_normal((256, hidden)).astype(np.float32) * 0.1
    runs: dict[str, list[Run]] = {"in-process": [], "gRPC": []}
    with grpc.insecure_channel(server.server.address, options=message_size_options()) as channel:
        stub = llm_pb2_grpc.LanguageModelStub(channel)
        over_grpc(stub, embedding, 2)  # connect + first-call costs out of the way
        for _ in range(repeats):  # alternate, so drifts in machine load hit both sides alike
            runs["in-process"].append(server.call(in_process(server.server, embedding, new_tokens)).result())
            runs["gRPC"].append(over_grpc(stub, embedding, new_tokens))
        prompt_tokens = server.server.service.builder.prepare(
            [ChatMessage("user", QUESTION)], [ImageEmbedding(embedding, "float32")], new_tokens
        ).prompt_tokens
    server.close()
    return {"name": name, "load_s": load_s, "hidden": hidden, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "runs": runs, "codec_ms": request_codec_ms(embedding, new_tokens),
            "embedding_kib": embedding.nbytes / 1024}


def median(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def table(results: list[dict[str, Any]], threads: int) -> str:
    rows, overhead = [], []
    for result in results:
        for path, runs in result["runs"].items():
            rows.append((f"{result['name']} (hidden {result['hidden']}, load {result['load_s']:.1f} s)",
                         result["prompt_tokens"], result["new_tokens"], path, f"{median(runs, 'ttft_s') * 1000:.0f}",
                         f"{median(runs, 'decode_tps'):.1f}", f"{median(runs, 'total_s'):.2f}",
                         f"{median(runs, 'cpu_s'):.2f}"))
        local, remote = result["runs"]["in-process"], result["runs"]["gRPC"]
        pairs = list(zip(local, remote, strict=True))
        ttft_ms = statistics.median(r.ttft_s - lo.ttft_s for lo, r in pairs) * 1000
        total_ms = statistics.median(r.total_s - lo.total_s for lo, r in pairs) * 1000
        cpu_ms = statistics.median(r.cpu_s - lo.cpu_s for lo, r in pairs) * 1000
        ratio = median(remote, "total_s") / median(local, "total_s")
        cpu_ratio = median(remote, "cpu_s") / median(local, "cpu_s")
        overhead.append(
            f"- {result['name']}: the gRPC hop adds (median of {len(pairs)} paired runs) {ttft_ms:+.1f} ms to TTFT, "
            f"{total_ms:+.1f} ms wall and {cpu_ms:+.1f} ms CPU to the whole request; ratios gRPC / in-process: "
            f"wall {ratio:.3f}, CPU {cpu_ratio:.3f}; building + serializing + parsing the request with its "
            f"{result['embedding_kib']:.0f} KiB embedding takes {result['codec_ms']:.2f} ms"
        )
    return "\n".join([
        f"\n## LLM service, transformers backend on CPU, fp32 ({utc_now()})\n",
        f"`bench/bench_llm.py`: {machine_line()} (the CPU is shared with other jobs: wall times are indicative, "
        f"CPU time (all threads of the process) is the steadier measure of the hop's cost); {threads} torch "
        f"threads, {versions('torch', 'transformers')}; greedy, one image (256 embedding rows) + a short question; "
        f"medians of the repeats, in-process and gRPC alternated on the same loaded model.\n",
        *markdown_table(["model", "prompt tok", "new tok", "path", "TTFT ms", "decode tok/s", "total s", "CPU s"], rows),
        "", *overhead, "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/ivl-bench-llm"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-append", action="store_true", help="print the table, do not touch RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        preset, new_tokens, repeats = MODELS[name]
        folder = checkpoint(args.cache_dir, preset)
        results.append(bench_model(name, folder, new_tokens, repeats, args.threads))
        print(f"done {name}")
    publish(table(results, args.threads), append=not args.no_append)


if __name__ == "__main__":
    main()
