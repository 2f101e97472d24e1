"""Command to ready UI: `python -m ivl_stack` on the tiny demo checkpoint, cold (checkpoint written)
then warm (cached), each followed by Ctrl-C; appends a table to bench/RESULTS.md.

Run: .venv/bin/python bench/bench_stack_startup.py [--runs 2]
(`scripts/run_stack.sh` adds scripts/setup_env.sh: ~0.5 s when the venv is up to date, minutes on a fresh one.)
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import add_paths, load_average, machine_line, markdown_table, publish, utc_now, versions

add_paths("tests")
from support.redis_server import free_port  # noqa: E402


def one_run(cache_dir: Path, workdir: Path) -> tuple[float, float, float]:
    """(seconds to the ready file, the launcher's own ready_s, seconds from SIGINT to exit)."""
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "ivl_stack", "--cache-dir", str(cache_dir), "--ready-file", str(ready)]
    for name in ("ui", "http", "grpc", "vision", "llm", "redis", "metrics"):
        argv += [f"--{name}-port", str(free_port())]
    started = time.monotonic()
    launcher = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not ready.exists():
        if launcher.poll() is not None:
            raise SystemExit(f"the launcher exited with {launcher.returncode}")
        time.sleep(0.05)
    to_ready = time.monotonic() - started
    stopping = time.monotonic()
    launcher.send_signal(signal.SIGINT)
    launcher.wait(timeout=120)
    return to_ready, json.loads(ready.read_text())["ready_s"], time.monotonic() - stopping


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2, help="warm runs after the cold one")
    args = parser.parse_args()
    load_start = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        rows.append(("cold: writes the tiny checkpoint", *one_run(cache, Path(tmp))))
        for i in range(args.runs):
            rows.append((f"warm {i + 1}: checkpoint cached", *one_run(cache, Path(tmp))))
    lines = [
        "",
        f"## Stack start-up: command to ready UI ({utc_now()})",
        "",
        f"`bench/bench_stack_startup.py`: {machine_line(load_start)} (shared CPU: indicative); {versions()}; "
        "`python -m ivl_stack` (redis + vision + LLM + gateway + Gradio UI) on the tiny demo checkpoint, free "
        "ports, then SIGINT.",
        "",
        *markdown_table(["run", "command to ready file (s)", "launcher's ready_s",
                         "SIGINT to exit, all children gone (s)"],
                        ((name, f"{a:.1f}", f"{b:.1f}", f"{c:.1f}") for name, a, b, c in rows)),
        "",
    ]
    publish("\n".join(lines), append=True)


if __name__ == "__main__":
    main()
