"""Bytes and milliseconds per hop of one image's embedding: vision service -> gateway -> Redis -> LLM service.

A 13-tile image (12 + thumbnail = 3328 rows) for a 2048-wide LLM (Mini-InternVL-Chat-2B-V1-5) and a 6144-wide one
(InternVL-Chat-V1-5), through each hop's real conversion code, in-process (no network: what the hop costs the
process that runs it, on top of gRPC's own transport copy):
  vision out   the encoder's numpy output -> the EncodeImagesResponse bytes handed to gRPC
  gateway in   those bytes -> the gateway's ImageEmbedding
  cache put    ImageEmbedding -> the Redis value (embedding_codec.encode_entry)
  cache get    the Redis value -> ImageEmbedding (decode_entry)
  gateway out  ImageEmbedding -> the GenerateRequest bytes handed to gRPC
  LLM in       those bytes -> the tensor the LLM writes into its input embeddings, and that write (bf16 LLM)
Two cases: a bf16 model computed in bf16 (GPU), and a bf16 model whose vision service computes in float32 (CPU:
before, fp32 on the wire; now the checkpoint's bf16, IVL_VISION_EMBEDDING_DTYPE=auto). `--code DIR=LABEL` runs
the same hops with another checkout's code (its own functions where it has them) in a subprocess, side by side.

    .venv/bin/python bench/bench_embedding_hops.py --code /tmp/before="before (8bb1ffa)"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import command_line, load_average, machine_line, markdown_table, publish, utc_now, versions

HEADING = "## Embedding hops: bytes and ms per hop, 13-tile image (bench/bench_embedding_hops.py)"
ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proto", "services/vision_encoder", "services/llm", "gateway")
HOPS = ("vision out", "gateway in", "cache put", "cache get", "gateway out", "LLM in")
ROWS = 13 * 256


def measure_here(hidden: int, wire_fp32: bool, repeats: int) -> dict[str, tuple[float, int]]:
    """{hop: (median ms, bytes that hop hands on)} with the code importable here (PYTHONPATH decides)."""
    import numpy as np
    import torch
    from ivl_gateway import embedding_codec, llm_client, vision_client
    from ivl_llm import servicer as llm_servicer
    from ivl_llm.backends.hf import embedding_to_torch
    from ivl_proto.common.v1 import common_pb2
    from ivl_proto.llm.v1 import llm_pb2
    from ivl_proto.vision.v1 import vision_pb2
    from ivl_vision import servicer as vision_servicer
    from ivl_vision.service import EncodedImage, EncodeResult, PlannedImage
    from ivl_vision.tiling import TilingConfig, plan_tiles

    rng = np.random.default_rng(0)
    values = torch.from_numpy(rng.standard_normal((ROWS, hidden), dtype=np.float32))
    new_dtype_rule = hasattr(vision_servicer, "encode_response_bytes")  # the embedding dtype setting came with it
    if wire_fp32 and not new_dtype_rule:
        array, dtype = values.numpy(), "float32"  # before: a float32 encoder sent float32
    else:
        array, dtype = values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), "bfloat16"
    plan = plan_tiles(3840, 2160, TilingConfig(max_tiles=12))
    planned = PlannedImage(plan, TilingConfig(max_tiles=12), ROWS)
    result = EncodeResult([EncodedImage(array, dtype, planned)], 0.1, 0.1, "fp")
    plan_pb = vision_servicer.plan_to_pb(planned)
    key = "ivl:emb:v1:fp:digest:t12-1-1"
    head = llm_pb2.GenerateRequest(messages=[llm_pb2.Message(role=common_pb2.ROLE_USER, content="<image>\nWhat is it?")])
    inputs_embeds = torch.empty(ROWS, hidden, dtype=torch.bfloat16)

    def vision_out() -> bytes:
        if new_dtype_rule:
            return vision_servicer.encode_response_bytes(result)
        from ivl_proto.tensor_codec import (
            tensor_to_pb,  # the servicer before: a message, then protobuf's serializer
        )
        image = result.images[0]
        return vision_pb2.EncodeImagesResponse(
            images=[vision_pb2.EncodedImage(embedding=tensor_to_pb(image.embedding, image.dtype), plan=plan_pb)],
            preprocess_s=0.1, encode_s=0.1, fingerprint="fp").SerializeToString()

    def gateway_in(raw: bytes) -> object:
        if hasattr(vision_client, "parse_encode_reply"):
            reply = vision_client.parse_encode_reply(raw)
            item, data = reply.response.images[0], reply.embedding_data[0]
        else:
            item = vision_pb2.EncodeImagesResponse.FromString(raw).images[0]
            data = item.embedding.data
        return embedding_codec.ImageEmbedding(item.embedding.dtype, tuple(item.embedding.shape), data, item.plan)

    def gateway_out(embedding: object) -> bytes:
        if hasattr(llm_client, "generate_request_bytes"):
            return llm_client.generate_request_bytes(head, [embedding.to_wire()])  # type: ignore[attr-defined]
        request = llm_pb2.GenerateRequest(messages=head.messages, image_embeddings=[embedding.to_tensor_pb()])  # type: ignore[attr-defined]
        return request.SerializeToString()

    def llm_in(raw: bytes) -> None:
        if hasattr(llm_servicer, "parse_generate"):
            call = llm_servicer.parse_generate(raw)
            embeddings = llm_servicer.embeddings_from_pb(call.request, call.embedding_data)
        else:
            embeddings = llm_servicer.embeddings_from_pb(llm_pb2.GenerateRequest.FromString(raw))
        inputs_embeds[:] = embedding_to_torch(embeddings[0]).to(dtype=inputs_embeds.dtype)

    def timed(fn, *args) -> tuple[float, object]:
        times, out = [], None
        for _ in range(repeats):
            started = time.perf_counter()
            out = fn(*args)
            times.append(time.perf_counter() - started)
            if _ < repeats - 1:
                del out
        return statistics.median(times) * 1000, out

    def size(value: object) -> int:
        return len(value) if isinstance(value, bytes) else memoryview(value.data).nbytes  # type: ignore[attr-defined]

    results: dict[str, tuple[float, int]] = {}
    ms, raw = timed(vision_out)
    results["vision out"] = (ms, size(raw))
    ms, embedding = timed(gateway_in, raw)
    results["gateway in"] = (ms, size(embedding))
    ms, value = timed(embedding_codec.encode_entry, key, embedding)
    results["cache put"] = (ms, size(value))
    ms, cached = timed(embedding_codec.decode_entry, key, value, hidden)
    results["cache get"] = (ms, size(cached))
    ms, request = timed(gateway_out, cached)
    results["gateway out"] = (ms, size(request))
    ms, _ = timed(llm_in, request)
    results["LLM in"] = (ms, inputs_embeds.numel() * inputs_embeds.element_size())
    return results


def measure_code(code: Path | None, args: argparse.Namespace) -> dict:
    """Run the measurement in a subprocess with `code`'s packages first on PYTHONPATH."""
    roots = [str((code or ROOT) / package) for package in PACKAGES]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    output = subprocess.run(
        [sys.executable, __file__, "--child", "--repeats", str(args.repeats)], env=env, check=True,
        capture_output=True, text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def parse_code(value: str) -> tuple[Path, str]:
    path, _, label = value.partition("=")
    return Path(path).resolve(), label or path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", type=parse_code, action="append", default=[])
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    cases = [(hidden, fp32) for hidden in (2048, 6144) for fp32 in (False, True)]
    if args.child:
        print(json.dumps({f"{hidden}/{int(fp32)}": measure_here(hidden, fp32, args.repeats) for hidden, fp32 in cases}))
        return 0
    argv_list = list(argv) if argv is not None else sys.argv[1:]
    started, load_start = time.perf_counter(), load_average()
    codes = [*args.code, (None, args.label)]
    runs = {label: measure_code(code, args) for code, label in codes}
    lines = ["", HEADING, "",
             f"- {utc_now()}; {machine_line(load_start)}; {versions('numpy', 'torch', 'google.protobuf')}",
             f"- command: {command_line('bench_embedding_hops.py', argv_list)} ({time.perf_counter() - started:.0f} s)",
             f"- in-process, median of {args.repeats}; each code in its own process; MB = 10^6 bytes handed on by the "
             "hop; gRPC's own transport copy (the same for all) not included", ""]
    headers = ["LLM width", "vision computes", "hop"]
    for _, label in codes:
        headers += [f"{label} MB", f"{label} ms"]
    rows = []
    for hidden, fp32 in cases:
        key = f"{hidden}/{int(fp32)}"
        for hop in HOPS:
            row = [str(hidden), "float32 (CPU)" if fp32 else "bfloat16 (GPU)", hop]
            for _, label in codes:
                ms, size = runs[label][key][hop]
                row += [f"{size / 1e6:.1f}", f"{ms:.1f}"]
            rows.append(row)
        totals = ["", "", "**all hops**"]
        for _, label in codes:
            totals += ["", f"**{sum(runs[label][key][hop][0] for hop in HOPS):.1f}**"]
        rows.append(totals)
    lines += markdown_table(headers, rows)
    publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
