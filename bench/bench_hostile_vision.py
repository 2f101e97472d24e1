"""Image attacks on the real stack, before/after: what attackers get, what a normal user waits, RSS, wasted CPU.

Runs the attacks of tests/support/vision_attacks.py (decode bombs with clients that hang up, 80 MP cheap
files, a 1 x 79,999,999 PNG, a client leaving mid-decode) against a ProcessBackend on loopback, one after
the other, while a normal user keeps sending new small images. `--code DIR` runs the services from another
checkout (e.g. a worktree of the commit before the decode sandbox, its stubs generated with
`.venv/bin/python DIR/proto/generate.py`) by putting its packages first on PYTHONPATH; the attacks and
the measuring stay this checkout's.

    .venv/bin/python bench/bench_hostile_vision.py                       # ~5 min, appends to RESULTS.md
    git worktree add /tmp/before 38f4087 && .venv/bin/python /tmp/before/proto/generate.py
    .venv/bin/python bench/bench_hostile_vision.py --code /tmp/before --label "before (38f4087)"
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (
    MIB,
    add_paths,
    command_line,
    load_average,
    machine_line,
    markdown_table,
    publish,
    utc_now,
)

add_paths("tests")
from support.service_processes import ProcessBackend  # noqa: E402
from support.vision_attacks import HANGUP, AttackReport, attacks, run_attack  # noqa: E402

HEADING = "## Image attacks on the stack, before/after (bench/bench_hostile_vision.py)"
PACKAGES = ("proto", "services/vision_encoder", "services/llm", "gateway", "tools/tiny_checkpoint")


def statuses(report: AttackReport) -> str:
    counts: dict[str, int] = {}
    for status in report.statuses:
        name = "hung up" if status == HANGUP else str(status)
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{count} x {name}" for name, count in sorted(counts.items()))


def row(label: str, report: AttackReport) -> tuple[str, ...]:
    vision = ("vision", report.rss_start.get("vision", 0), report.rss_peak.get("vision", 0),
              report.rss_after.get("vision", 0))
    message = next((m for m in report.messages if m and m != "hung up"), "")
    return (
        report.name, label, statuses(report), message[:90].replace("|", "/"),
        f"{report.baseline_s:.2f}", f"{report.worst_normal_s:.2f}",
        " / ".join(f"{v // MIB}" for v in vision[1:]), f"{report.cpu_after_leaving_s:.1f}",
        "yes" if report.alive else "NO", f"{report.seconds:.0f}",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", type=Path, help="run the services from this checkout instead")
    parser.add_argument("--label", default="", help="the column label (default: this checkout)")
    parser.add_argument("--attacks", default=",".join(attacks()), help="comma-separated attack names")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ivl_tiny import TinySpec, write_tiny_checkpoint

    if args.code is not None:
        roots = [str((args.code / package).resolve()) for package in PACKAGES]
        os.environ["PYTHONPATH"] = os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")])
    label = args.label or ("after (this checkout)" if args.code is None else str(args.code))
    load_start = load_average()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = write_tiny_checkpoint(Path(folder) / "ckpt", TinySpec(), layout="original")
        backend = ProcessBackend(checkpoint, gateway={"default_max_tiles": 2, "vision_timeout_s": 300},
                                 llm={"context_length": 8192})
        backend.start()
        try:
            for name in args.attacks.split(","):
                report = run_attack(backend, attacks()[name])
                rows.append(row(label, report))
                print(rows[-1], flush=True)
                if not report.alive:
                    break
        finally:
            backend.stop()
    lines = [
        "", HEADING, "",
        f"- {utc_now()}; {machine_line(load_start)}; services from {label}",
        f"- command: {command_line('bench_hostile_vision.py', args.argv)} ({time.perf_counter() - started:.0f} s)",
        "- attackers send different files (no cache sharing); a normal user sends a new 320x240 PNG every 0.3 s "
        "during the attack (normal: before the attack / worst during). RSS: the vision service with its decode "
        "workers, MiB at the peak / after. Wasted CPU: vision CPU seconds in the 3 s after every attacker had "
        "gone or been answered.",
        "",
        *markdown_table(["attack", "code", "attackers got", "message", "normal s", "normal worst s",
                         "vision RSS peak / after", "wasted CPU s", "all up", "s"], rows),
    ]
    publish("\n".join(lines) + "\n", append=not args.no_append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
