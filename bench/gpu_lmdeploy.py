"""GPU checks of the LLM service's backends, one script for a GPU machine (torch + transformers; LMDeploy
if installed; no generated gRPC stubs and no pydantic-settings needed):

    python bench/gpu_lmdeploy.py          # puts services/llm, proto, tools/tiny_checkpoint on sys.path

1. transformers backend on CUDA: the tiny InternLM2 checkpoint (original layout), greedy token ids in
   fp32 on CUDA vs fp32 on the CPU (must be equal), with one image's embedding rows in the prompt.
2. transformers backend on CUDA, bf16, ivl_tiny's "qwen2-0.5b" preset (random weights at Qwen2-0.5B
   size): time to first token and decode tokens/s.
3. LMDeploy TurboMind backend (ivl_llm.backends.lmdeploy_backend with the real lmdeploy API), the same
   qwen2-0.5b checkpoint: input_ids + input_embeddings + input_embedding_ranges, greedy ids compared with
   the transformers backend (bf16: the common prefix is reported), TTFT / decode tokens/s, and
   cancellation (closing the stream gives the engine instance back). Skipped, saying so, without lmdeploy.
Prints a markdown report and writes it to $OUT/gpu_llm.md when OUT is set. Stays well under 4 minutes.

    python bench/gpu_lmdeploy.py --device cpu    # smoke test of the script itself, no GPU (skips 3)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchlib import add_paths, versions

add_paths("services/llm", "proto", "tools/tiny_checkpoint")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ivl_llm.backends.hf import TransformersBackend  # noqa: E402
from ivl_llm.checkpoint import load_tokenizer, read_checkpoint  # noqa: E402
from ivl_llm.prompt import ImageEmbedding, PromptBuilder  # noqa: E402
from ivl_llm.sampling import Sampling  # noqa: E402
from ivl_llm.templates import ChatMessage, get_template  # noqa: E402
from ivl_tiny import TinySpec, spec_from_preset, write_tiny_checkpoint  # noqa: E402

QUESTION = "<image>\nDescribe the image in detail."


def prepare(folder: Path, new_tokens: int) -> tuple[Any, Any, Any, frozenset[int]]:
    ckpt = read_checkpoint(folder)
    tokenizer = load_tokenizer(folder)
    template = get_template(ckpt.template)
    builder = PromptBuilder(tokenizer, template, ckpt.hidden_size, ckpt.context_length)
    embedding = np.random.default_rng(0).standard_normal((256, ckpt.hidden_size)).astype(np.float32) * 0.1
    prompt = builder.prepare([ChatMessage("user", QUESTION)], [ImageEmbedding(embedding, "float32")], new_tokens)
    stops = frozenset({tokenizer.convert_tokens_to_ids(template.stop_token)})  # where the reference stops
    return ckpt, prompt, tokenizer, stops


async def run(backend: Any, prompt: Any, stops: frozenset[int]) -> tuple[list[int], float, float]:
    ids, stamps = [], []
    started = time.perf_counter()
    async for token in backend.generate(prompt, Sampling(max_new_tokens=prompt.max_new_tokens), stops):
        ids.append(token.token_id)
        stamps.append(time.perf_counter())
    ttft = stamps[0] - started
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return ids, ttft, tps


async def hf_ids(folder: Path, dtype: str, device: str, new_tokens: int) -> tuple[list[int], float, float]:
    ckpt, prompt, _, stops = prepare(folder, new_tokens)
    backend = TransformersBackend(ckpt, dtype, device, 1)
    await backend.start()
    await run(backend, prompt, stops)  # warm-up (CUDA kernels, allocator)
    result = await run(backend, prompt, stops)
    await backend.close()
    return result


async def lmdeploy_check(folder: Path, new_tokens: int, reference: list[int]) -> list[str]:
    try:
        import lmdeploy
    except ImportError:
        return ["- LMDeploy: SKIPPED, lmdeploy is not installed on this machine (pip install 'ivl-llm[lmdeploy]')."]
    from ivl_llm.backends.lmdeploy_backend import LMDeployBackend

    ckpt, prompt, _, stops = prepare(folder, new_tokens)
    settings = SimpleNamespace(dtype="bfloat16", instances=2, max_concurrency=2, tp=1, session_len=4096,
                               context_length=0, cache_max_entry_count=0.3)
    backend = LMDeployBackend(ckpt, settings)  # type: ignore[arg-type]
    await backend.start()
    await run(backend, prompt, stops)
    ids, ttft, tps = await run(backend, prompt, stops)
    same = next((i for i, (a, b) in enumerate(zip(ids, reference, strict=False)) if a != b), min(len(ids), len(reference)))
    generation = backend.generate(prompt, Sampling(max_new_tokens=prompt.max_new_tokens), stops)
    async for _ in generation:
        break
    generation.cancel()
    await asyncio.wait_for(generation.finished, 10)
    pool_back = backend.pool.qsize() == backend.instances
    await backend.close()
    return [
        f"- LMDeploy {lmdeploy.__version__} TurboMind bf16, qwen2-0.5b: TTFT {ttft * 1000:.1f} ms, decode {tps:.1f} tok/s, "
        f"{len(ids)} tokens; greedy ids equal to the transformers bf16 backend for the first {same} tokens",
        f"- LMDeploy cancellation: instance back in the pool after cancel: {pool_back}",
    ]


async def main_async(device: str) -> list[str]:
    lines = [
        "## LLM service on GPU (bench/gpu_lmdeploy.py)",
        "",
        f"{platform.node()} {platform.machine()}, {versions('torch', 'transformers')}, "
        f"device {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_checkpoint(Path(tmp) / "tiny", TinySpec(), layout="original")
        cpu_ids, _, _ = await hf_ids(tiny, "float32", "cpu", 32)
        dev_ids, _, _ = await hf_ids(tiny, "float32", device, 32)
        lines.append(f"- tiny InternLM2, fp32 greedy ids {device} == cpu: {dev_ids == cpu_ids} ({len(cpu_ids)} tokens)")
        started = time.perf_counter()
        big = write_tiny_checkpoint(Path(tmp) / "qwen", spec_from_preset("qwen2-0.5b"), layout="original")
        lines.append(f"- wrote the qwen2-0.5b checkpoint in {time.perf_counter() - started:.1f} s")
        dtype = "bfloat16" if device == "cuda" else "float32"
        new_tokens = 128 if device == "cuda" else 8
        ref_ids, ttft, tps = await hf_ids(big, dtype, device, new_tokens)
        lines.append(
            f"- transformers backend {dtype} on {device}, qwen2-0.5b, 1 image + question "
            f"({new_tokens} new tokens): TTFT {ttft * 1000:.1f} ms, decode {tps:.1f} tok/s"
        )
        if device == "cuda":
            try:
                lines += await lmdeploy_check(big, new_tokens, ref_ids)
            except Exception:
                lines.append("- LMDeploy check FAILED:\n```\n" + traceback.format_exc() + "```")
        else:
            lines.append("- LMDeploy: skipped on --device cpu")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --device cpu for a smoke test")
    report = "\n".join(asyncio.run(main_async(args.device))) + "\n"
    print(report)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_llm.md").write_text(report)


if __name__ == "__main__":
    main()
