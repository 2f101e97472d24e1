"""Concurrency benchmark: 1, 4, 16, 32 concurrent chat clients through the gateway's OpenAI HTTP API.

The stack runs as real processes, one per service (redis-server, `python -m ivl_vision`,
`python -m ivl_llm`, `python -m ivl_gateway`), so that each service's memory (RSS) is its own. Each
level sends `--requests-per-client` x clients streaming chats, half with a NEW image (a cache miss:
decode, tile, encode) and half with one of four REPEATED images (a Redis hit after the first time);
it reports requests/s, p50/p95/p99 time to first token (client side: request sent -> first content
delta), errors (must be 0; a refusal with a clear status such as 429 is counted apart), the cache hit
share, and each service's RSS before/after. The memory check: after the ladder the top level runs
once more, and no service may grow by more than --rss-bound-mib over that identical second round
(RSS is a high-water mark, so growth through the ladder is reported apart as working set).

The checkpoint is ivl_tiny's "tiny" preset by default: what is measured is the serving stack
(HTTP, gRPC, Redis, batching, scheduling, cancellation-safe streaming) under concurrency, not the
model; pass --preset encoder-heavy for a vision-bound mix (slow on CPU).

    .venv/bin/python bench/bench_concurrency.py                         # appends to bench/RESULTS.md
    .venv/bin/python bench/bench_concurrency.py --levels 1,4 --requests-per-client 2 --no-append
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (
    MIB,
    add_paths,
    command_line,
    machine_line,
    markdown_table,
    publish,
    table_row,
    utc_now,
    versions,
)

add_paths("tests")
from support.load_client import (  # noqa: E402
    ChatOutcome,
    chat_body,
    percentile,
    run_clients,
    split_outcomes,
    unique_png,
)
from support.service_processes import ProcessBackend  # noqa: E402

HEADING = "## Concurrency through the gateway (bench/bench_concurrency.py)"


def machine() -> str:
    """The machine and versions line the concurrency and soak sections share."""
    return f"{machine_line()} (shared with other jobs); {versions('torch', 'transformers', 'grpc')}"


def write_checkpoint(preset: str, folder: Path) -> Path:
    from ivl_tiny import write_tiny_checkpoint
    from ivl_tiny.spec import spec_from_preset

    return write_tiny_checkpoint(folder / preset, spec_from_preset(preset))


def level_bodies(level: int, width: int, height: int, max_tokens: int, repeated: list[bytes]):
    def body(i: int) -> dict:
        if i % 2 == 0:
            return chat_body(f"What is in picture {i}?", [unique_png(level * 100_000 + i, width, height)],
                             max_tokens=max_tokens)
        return chat_body(f"Describe it ({i}).", [repeated[i % len(repeated)]], max_tokens=max_tokens)

    return body


def summarize(level: int, outcomes: list[ChatOutcome], seconds: float, rss_before: dict, rss_after: dict) -> dict:
    answered, refused, errors = split_outcomes(outcomes)
    ttfts = [o.ttft_s for o in answered if o.ttft_s is not None]
    repeated = [o for i, o in enumerate(outcomes) if i % 2 == 1 and o.ok]
    new = [o.ttft_s for i, o in enumerate(outcomes) if i % 2 == 0 and o.ok and o.ttft_s is not None]
    hit = [o.ttft_s for o in repeated if o.ttft_s is not None]
    return {
        "clients": level, "requests": len(outcomes), "answered": len(answered), "refused": len(refused),
        "errors": len(errors), "error_samples": [(o.status, o.error_code, o.error_message[:120]) for o in errors[:3]],
        "seconds": seconds, "rps": len(answered) / seconds,
        "p50": percentile(ttfts, 50) if ttfts else float("nan"),
        "p95": percentile(ttfts, 95) if ttfts else float("nan"),
        "p99": percentile(ttfts, 99) if ttfts else float("nan"),
        "p50_new": percentile(new, 50) if new else float("nan"),
        "p50_hit": percentile(hit, 50) if hit else float("nan"),
        "hit_share": sum((o.cache_hits or 0) for o in repeated) / max(1, len(repeated)),
        "rss_before": rss_before, "rss_after": rss_after,
    }


def run(args: argparse.Namespace) -> tuple[list[dict], dict, dict]:
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="ivl-bench-conc-") as tmp:
        ckpt = write_checkpoint(args.preset, Path(tmp))
        backend = ProcessBackend(
            ckpt,
            gateway={"default_max_tiles": args.max_tiles, "max_images_per_request": 4},
            llm={"max_concurrency": args.llm_slots, "max_queue": max(levels) * 2, "context_length": 8192},
            vision={"max_batch_tiles": 32, "batch_wait_ms": 5},
        )
        backend.start()
        try:
            repeated = [unique_png(7_000_000 + i, args.width, args.height) for i in range(4)]
            warm = asyncio.run(run_clients(backend.gateway.http_url, 2, 8, level_bodies(0, args.width, args.height,
                                                                                      args.max_tokens, repeated)))
            assert all(o.ok for o in warm), [(o.status, o.error_code, o.error_message) for o in warm]
            rows = []
            for level in levels:
                before = backend.rss()
                count = level * args.requests_per_client
                bodies = level_bodies(level, args.width, args.height, args.max_tokens, repeated)
                started = time.perf_counter()
                outcomes = asyncio.run(run_clients(backend.gateway.http_url, level, count, bodies))
                seconds = time.perf_counter() - started
                rows.append(summarize(level, outcomes, seconds, before, backend.rss()))
                print(table_row(row_cells(rows[-1])), flush=True)
            # Leak check: the top level once more. RSS after a level is a high-water mark (Python and
            # glibc keep freed memory), so growth through the ladder is the working set of more clients;
            # a leak shows as growth between two identical rounds.
            top = levels[-1]
            start_rss = backend.rss()
            started = time.perf_counter()
            outcomes = asyncio.run(run_clients(backend.gateway.http_url, top, top * args.requests_per_client,
                                               level_bodies(top + 1, args.width, args.height, args.max_tokens,
                                                            repeated)))
            rows.append(summarize(top, outcomes, time.perf_counter() - started, start_rss, backend.rss()))
            rows[-1]["repeat"] = True
            end_rss = backend.rss()
        finally:
            backend.stop()
    return rows, start_rss, end_rss


def row_cells(row: dict) -> list:
    rss = " / ".join(f"{row['rss_before'][n] / MIB:.0f}->{row['rss_after'][n] / MIB:.0f}"
                     for n in ("gateway", "vision", "llm"))
    clients = f"{row['clients']} (again)" if row.get("repeat") else str(row["clients"])
    return [clients, row["requests"], f"{row['rps']:.2f}", f"{row['p50'] * 1000:.0f}", f"{row['p95'] * 1000:.0f}",
            f"{row['p99'] * 1000:.0f}", f"{row['p50_new'] * 1000:.0f} / {row['p50_hit'] * 1000:.0f}", row["errors"],
            row["refused"], f"{row['hit_share']:.2f}", rss]


def report(args: argparse.Namespace, rows: list[dict], start_rss: dict, end_rss: dict, elapsed: float) -> str:
    growth = {n: (end_rss[n] - start_rss[n]) / MIB for n in start_rss}
    within = all(g <= args.rss_bound_mib for g in growth.values())
    errors = sum(r["errors"] for r in rows)
    ladder = [r for r in rows if not r.get("repeat")]
    base = ladder[0]["rps"]
    peak = {n: (ladder[-1]["rss_after"][n] - ladder[0]["rss_before"][n]) / MIB for n in start_rss}
    lines = [
        "", HEADING, "",
        f"- date: {utc_now()}; machine: {machine()}",
        f"- stack: redis-server + `python -m ivl_vision` + `python -m ivl_llm` + `python -m ivl_gateway`, one "
        f"process each on loopback, ivl_tiny preset `{args.preset}`, fp32 CPU, 1 torch thread per service; "
        f"LLM {args.llm_slots} slots; max_tiles {args.max_tiles} + thumbnail, {args.width}x{args.height} PNG, "
        f"{args.max_tokens} new tokens, streaming OpenAI HTTP",
        f"- mix: half new images (cache misses), half one of 4 repeated images (hits); "
        f"{args.requests_per_client} requests per client per level",
        f"- command: {command_line('bench_concurrency.py', args.argv)} ({elapsed:.0f} s)",
        "",
        *markdown_table(["clients", "requests", "answered req/s", "TTFT p50 ms", "p95 ms", "p99 ms",
                         "p50 new / repeated image ms", "errors", "refused (4xx)", "hits per repeated req",
                         "RSS MiB before->after: gateway / vision / LLM"], (row_cells(r) for r in rows)),
        "",
        "- throughput vs 1 client: " + ", ".join(f"{r['clients']} clients x{r['rps'] / base:.2f}" for r in ladder),
        f"- worst p99 TTFT: {max(r['p99'] for r in rows) * 1000:.0f} ms ({max(rows, key=lambda r: r['p99'])['clients']}"
        " clients)",
        "- RSS from 1 client to the end of the ladder (the working set of more concurrent requests; freed memory "
        "stays with the process): " + ", ".join(f"{n} {g:+.1f} MiB" for n, g in peak.items()),
        f"- errors: {errors} (must be 0){'' if errors == 0 else ' FAIL: ' + str([r['error_samples'] for r in rows])}",
        f"- leak check, RSS growth over a second identical {ladder[-1]['clients']}-client round (bound "
        f"{args.rss_bound_mib} MiB per service): "
        + ", ".join(f"{n} {g:+.1f} MiB" for n, g in growth.items()) + (" - within bound" if within else " - OVER"),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,4,16,32", help="comma-separated client counts")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--llm-slots", type=int, default=4, help="LLM max_concurrency")
    parser.add_argument("--max-tiles", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--rss-bound-mib", type=float, default=16.0)
    parser.add_argument("--no-append", action="store_true", help="print the table, do not touch RESULTS.md")
    args = parser.parse_args(argv)
    args.argv = argv
    started = time.perf_counter()
    rows, start_rss, end_rss = run(args)
    text = report(args, rows, start_rss, end_rss, time.perf_counter() - started)
    publish(text, append=not args.no_append)
    bad = sum(r["errors"] for r in rows) > 0 or any(
        (end_rss[n] - start_rss[n]) / MIB > args.rss_bound_mib for n in start_rss)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
