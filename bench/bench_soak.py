"""Soak: N concurrent chat clients through the gateway for a fixed duration, memory sampled as it runs.

The longer version of tests/load/test_load_short.py. The stack runs as real processes (redis-server,
`python -m ivl_vision`, `python -m ivl_llm`, `python -m ivl_gateway`); the clients loop on the
OpenAI HTTP API with streaming, a third new images, a third repeated images, a third text only,
until --duration-s is over (the requests in flight then finish; none is started after). Every
--sample-s the RSS of each service is recorded. Pass/fail (exit status 1 on fail):

- errors == 0 (a refusal with a clear status, e.g. 429 when the LLM queue is full, is counted apart);
- each service's RSS at the end minus its RSS after the first sample window <= --rss-bound-mib;
- every service process still alive and the gateway /ready at the end.

    .venv/bin/python bench/bench_soak.py                          # 8 clients, 120 s; appends to RESULTS.md
    .venv/bin/python bench/bench_soak.py --clients 4 --duration-s 20 --no-append
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_concurrency import machine, write_checkpoint
from benchlib import MIB, add_paths, command_line, markdown_table, publish, utc_now

add_paths("tests")
from support.load_client import (  # noqa: E402
    ChatOutcome,
    chat_body,
    percentile,
    split_outcomes,
    stream_chat,
    unique_png,
)
from support.service_processes import ProcessBackend  # noqa: E402

HEADING = "## Soak through the gateway (bench/bench_soak.py)"


async def soak(backend: ProcessBackend, args: argparse.Namespace) -> tuple[list[ChatOutcome], list[dict]]:
    repeated = [unique_png(8_000_000 + i, args.width, args.height) for i in range(4)]
    counter = iter(range(10**9))
    outcomes: list[ChatOutcome] = []
    samples: list[dict] = []
    stop_at = time.monotonic() + args.duration_s

    def body(i: int) -> dict:
        if i % 3 == 0:
            return chat_body(f"new {i}", [unique_png(9_000_000 + i, args.width, args.height)], max_tokens=args.max_tokens)
        if i % 3 == 1:
            return chat_body(f"again {i}", [repeated[i % 4]], max_tokens=args.max_tokens)
        return chat_body(f"text {i}", max_tokens=args.max_tokens)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < stop_at:
            outcomes.append(await stream_chat(client, backend.gateway.http_url, body(next(counter))))

    async def sampler() -> None:
        started = time.monotonic()
        while time.monotonic() < stop_at:
            samples.append({"t": time.monotonic() - started, "requests": len(outcomes), **backend.rss()})
            await asyncio.sleep(args.sample_s)

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(sampler(), *(client_loop(client) for _ in range(args.clients)))
    samples.append({"t": args.duration_s, "requests": len(outcomes), **backend.rss()})
    return outcomes, samples


def report(args: argparse.Namespace, outcomes: list[ChatOutcome], samples: list[dict], alive: bool,
           elapsed: float) -> tuple[str, bool]:
    answered, refused, errors = split_outcomes(outcomes)
    ttfts = [o.ttft_s for o in answered if o.ttft_s is not None]
    base = samples[1] if len(samples) > 2 else samples[0]
    growth = {n: (samples[-1][n] - base[n]) / MIB for n in ("gateway", "vision", "llm")}
    ok = not errors and alive and all(g <= args.rss_bound_mib for g in growth.values())
    lines = [
        "", HEADING, "",
        f"- date: {utc_now()}; machine: {machine()}",
        f"- {args.clients} clients for {args.duration_s:.0f} s, ivl_tiny preset `{args.preset}`, one process per "
        f"service; mix 1/3 new image, 1/3 repeated image, 1/3 text; {args.max_tokens} new tokens",
        f"- command: {command_line('bench_soak.py', args.argv)} ({elapsed:.0f} s)",
        f"- requests: {len(outcomes)} ({len(answered) / args.duration_s:.2f} answered/s), answered "
        f"{len(answered)}, refused with a clear status {len(refused)}, errors {len(errors)}"
        + (f" e.g. {[(o.status, o.error_code, o.error_message[:100]) for o in errors[:3]]}" if errors else ""),
        f"- TTFT p50 / p95 / p99: {percentile(ttfts, 50) * 1000:.0f} / {percentile(ttfts, 95) * 1000:.0f} / "
        f"{percentile(ttfts, 99) * 1000:.0f} ms" if ttfts else "- TTFT: no answered request",
        "",
        *markdown_table(["t s", "requests done", "gateway RSS MiB", "vision RSS MiB", "LLM RSS MiB"],
                        ([f"{s['t']:.0f}", s["requests"], *(f"{s[n] / MIB:.1f}" for n in ("gateway", "vision", "llm"))]
                         for s in samples)),
        "",
        f"- RSS growth from t={base['t']:.0f} s to the end (bound {args.rss_bound_mib} MiB each): "
        + ", ".join(f"{n} {g:+.1f} MiB" for n, g in growth.items()),
        f"- every process alive and /ready at the end: {alive}; verdict: {'PASS' if ok else 'FAIL'}",
    ]
    return "\n".join(lines) + "\n", ok


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--llm-slots", type=int, default=2)
    parser.add_argument("--llm-queue", type=int, default=4, help="LLM max_queue: small, so refusals happen")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--rss-bound-mib", type=float, default=32.0)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    args.argv = argv
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ivl-bench-soak-") as tmp:
        backend = ProcessBackend(
            write_checkpoint(args.preset, Path(tmp)),
            gateway={"default_max_tiles": 2},
            llm={"max_concurrency": args.llm_slots, "max_queue": args.llm_queue, "context_length": 8192},
        )
        backend.start()
        try:
            outcomes, samples = asyncio.run(soak(backend, args))
            alive = all(s.alive for s in backend.services) and backend.gateway.ready()[0] == 200
        finally:
            backend.stop()
    text, ok = report(args, outcomes, samples, alive, time.perf_counter() - started)
    publish(text, append=not args.no_append)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
