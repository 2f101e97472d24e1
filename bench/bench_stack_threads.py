"""How the launcher runs torch in its two model services, side by side in one run: its default (torch's own
thread count, every core, with OMP_WAIT_POLICY=PASSIVE) against what it did before (OpenMP's default wait
policy: idle threads spin a while after each parallel region) and against one thread per service.

Each `python -m ivl_stack --no-ui` stack serves the same native-layout ivl_tiny checkpoint, configured by one
entry of --stacks (THREADS:POLICY; THREADS `default` = no --torch-threads, POLICY `default` = OpenMP's own, set
through IVL_STACK_OMP_WAIT_POLICY); the same requests as bench_vs_transformers_serve.py (1280x720 PNG = 9 tiles,
greedy, 8 new tokens, streaming): TTFT of a new image and of the same image again (rounds alternating between
the stacks), a 5-turn chat, and 8 concurrent clients in --level-rounds rounds, the stacks back to back in
rotating order (answered req/s, TTFT p50, CPU ms per answered request of each stack's processes and their
children). All stacks run at once; one is measured at a time.

    .venv/bin/python bench/bench_stack_threads.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench_vs_transformers_serve import (
    HEIGHT,
    WIDTH,
    Level,
    Server,
    concurrent,
    single_client,
)
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
from support.launcher_process import LauncherProcess  # noqa: E402
from support.load_client import unique_png  # noqa: E402

HEADING = "## The launcher's torch threads per model service (bench/bench_stack_threads.py)"


@dataclass(frozen=True)
class StackConfig:
    threads: int | None  # --torch-threads; None = torch's default
    wait_policy: str  # IVL_STACK_OMP_WAIT_POLICY; "" = OpenMP's default

    @classmethod
    def parse(cls, text: str) -> StackConfig:
        threads, policy = text.split(":")
        return cls(None if threads == "default" else int(threads), "" if policy == "default" else policy.upper())

    @property
    def name(self) -> str:
        threads = "torch's threads" if self.threads is None else f"{self.threads} thread(s)"
        return f"{threads}, {self.wait_policy or 'OpenMP default'}"


@contextlib.contextmanager
def launcher(model: Path, config: StackConfig, tmp: Path) -> Iterator[Server]:
    """`python -m ivl_stack` on free ports as `config` says, ready; stopped (SIGTERM) afterwards."""
    extra = ["--torch-threads", str(config.threads)] if config.threads is not None else []
    stack = LauncherProcess(Path(tempfile.mkdtemp(dir=tmp)), model, *extra, pin_services=False,
                            env={"IVL_STACK_OMP_WAIT_POLICY": config.wait_policy}).start()
    try:
        stack.wait_ready(timeout_s=600)
        pids = tuple(stack.pids()[name] for name in ("redis", "vision", "llm", "gateway"))
        yield Server(config.name, stack.http_url, stack.served_model(), pids)
    finally:
        stack.signal(signal.SIGTERM)  # as Ctrl-C; SIGINT is ignored by a background job's children
        stack.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stacks", type=lambda s: [StackConfig.parse(x) for x in s.split(",")],
                        default=[StackConfig(None, "PASSIVE"), StackConfig(None, ""), StackConfig(1, "PASSIVE")],
                        help="THREADS:POLICY of each stack, comma-separated; the first is compared with the others "
                             "(default: default:PASSIVE,default:default,1:PASSIVE)")
    parser.add_argument("--rounds", type=int, default=5, help="new/repeated image rounds")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--level-rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ivl_tiny import TinySpec, write_tiny_checkpoint

    started, load_start = time.perf_counter(), load_average()
    with tempfile.TemporaryDirectory(prefix="ivl-threads-") as tmp_name, contextlib.ExitStack() as stacks:
        tmp = Path(tmp_name)
        model = write_tiny_checkpoint(tmp / "ivl-tiny-native", TinySpec(), layout="native")
        servers = [stacks.enter_context(launcher(model, config, tmp)) for config in args.stacks]
        single, chats = single_client(servers, args.rounds, args.max_tokens)
        repeated = [unique_png(600_000 + i, WIDTH, HEIGHT) for i in range(4)]
        levels: dict[str, list[Level]] = {s.name: [] for s in servers}
        for round_index in range(args.level_rounds):
            order = servers[round_index % len(servers):] + servers[:round_index % len(servers)]
            for server in order:
                result = asyncio.run(concurrent(server, args.clients, args.per_client, 10_000 * round_index,
                                                args.max_tokens, repeated))
                levels[server.name].append(result)
                print(server.name, round_index, result, flush=True)
    publish(report(servers, single, chats, levels, args, time.perf_counter() - started, load_start),
            append=not args.no_append)
    return 0


def report(servers, single, chats, levels, args, elapsed, load_start) -> str:
    names = [s.name for s in servers]
    med = {name: {k: statistics.median(v) * 1000 for k, v in single[name].items()} for name in names}
    first, others = names[0], names[1:]

    def ratios(values: dict[str, float], lower_is_better: bool) -> str:
        return ", ".join(f"{(values[o] / values[first]) if lower_is_better else (values[first] / values[o]):.2f}x vs {o}"
                         for o in others)

    new = {n: med[n]["new"] for n in names}
    again = {n: med[n]["repeated"] for n in names}
    turns = {n: sum(chats[n]) for n in names}
    rps = {n: statistics.median(r.rps for r in levels[n]) for n in names}
    per_round = {o: statistics.median(a.rps / b.rps for a, b in zip(levels[first], levels[o], strict=True))
                 for o in others}

    def level_cell(n: str) -> str:
        runs = levels[n]
        return (f"{rps[n]:.2f} ({statistics.median(r.ttft_p50_ms for r in runs):.0f}; {sum(r.errors for r in runs)}; "
                f"{statistics.median(r.cpu_ms for r in runs):.0f})")

    rows = [
        ("TTFT, new image (median ms)", *(f"{new[n]:.0f}" for n in names), ratios(new, True)),
        ("TTFT, same image again (median ms)", *(f"{again[n]:.0f}" for n in names), ratios(again, True)),
        ("5-turn chat, total s", *(f"{turns[n]:.2f}" for n in names), ratios(turns, True)),
        (f"{args.clients} clients, answered req/s (TTFT p50 ms; errors; CPU ms per request)",
         *(level_cell(n) for n in names), ", ".join(f"{per_round[o]:.2f}x vs {o}" for o in others)),
    ]
    lines = [
        "", HEADING, "",
        f"- {utc_now()}; {machine_line(load_start)}; {versions('torch', 'transformers', 'grpc')}",
        f"- command: {command_line('bench_stack_threads.py', args.argv)} ({elapsed:.0f} s)",
        f"- `python -m ivl_stack --no-ui`, one stack each: {'; '.join(s.name for s in servers)} (torch's default "
        f"threads here: {len(os.sched_getaffinity(0))}), all running, one at a time measured; ivl_tiny "
        f"default spec, native layout, fp32 CPU; {WIDTH}x{HEIGHT} PNG = 9 tiles; greedy, {args.max_tokens} new tokens; "
        f"new/repeated: {args.rounds} rounds alternating; {args.clients} clients x {args.per_client} requests, half "
        f"new images, {args.level_rounds} rounds back to back in rotating order: the medians, and the median of the "
        f"per-round ratios; `{first} ahead by` = the other's time / this one's (req/s: this one's / the other's)",
        f"- {args.clients} clients, req/s per round: "
        + "; ".join(f"{n}: " + ", ".join(f"{r.rps:.2f}" for r in levels[n]) for n in names),
        "",
        *markdown_table(["measurement", *names, f"{first} ahead by"], rows),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
