"""The bookkeeping every bench/ script shares: where the repo is, what machine ran, which versions, when,
markdown tables and appending a section to bench/RESULTS.md.

Standard library only (torch, grpc, ... are imported lazily by `versions()` and only when named), so the
GPU scripts can use it on a machine without the project's venv. Each script is run as
`python bench/<name>.py`, which puts bench/ on sys.path: `import benchlib` works from any of them.

    from benchlib import add_paths, machine_line, markdown_table, publish, utc_now, versions

    load_at_start = load_average()
    ...
    text = "\\n".join([f"- {utc_now()}; {machine_line(load_at_start)}; {versions('torch', 'grpc')}",
                       "", *markdown_table(["batch", "tiles/s"], [[str(b), f"{r:.1f}"] for b, r in rows])])
    publish(text, append=not args.no_append)
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
MIB = 2**20
# The name a package is installed and reported under, where it differs from the module imported.
_DISTRIBUTION_NAMES = {"grpc": "grpcio", "PIL": "Pillow"}


def add_paths(*folders: str) -> None:
    """Put repo folders (e.g. "tests", "services/llm") at the front of sys.path, once each."""
    for folder in folders:
        path = str(ROOT / folder)
        if path not in sys.path:
            sys.path.insert(0, path)


def cpu_model() -> str:
    """The CPU's model name from lscpu ("Intel(R) Xeon(R) Processor"), else the platform's best guess."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    for line in lscpu.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> float:
    """The 1-minute load average now (the CPUs here are shared with other jobs)."""
    return os.getloadavg()[0]


def machine_line(load_at_start: float | None = None) -> str:
    """'Intel(R) Xeon(R) Processor, 2 cores; 1-min load average 4.7 at start, 6.8 at end' (without a start
    value: '... 1-min load average 6.8 at the end')."""
    now = load_average()
    load = (f"1-min load average {load_at_start:.1f} at start, {now:.1f} at end" if load_at_start is not None
            else f"1-min load average {now:.1f} at the end")
    return f"{cpu_model()}, {os.cpu_count()} cores; {load}"


def versions(*modules: str) -> str:
    """'Python 3.11.7, torch 2.13.0+cpu, grpcio 1.85.1' for the named modules (imported here if needed)."""
    parts = [f"Python {platform.python_version()}"]
    for name in modules:
        version = getattr(importlib.import_module(name), "__version__", "?")
        parts.append(f"{_DISTRIBUTION_NAMES.get(name, name)} {version}")
    return ", ".join(parts)


def utc_now() -> str:
    """'2026-11-26 09:34 UTC'."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that produced a section, as a user reruns it: '`.venv/bin/python bench/x.py --quick`'."""
    return "`" + " ".join([".venv/bin/python", f"bench/{script}", *argv]) + "`"


def table_row(cells: Iterable[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_table(headers: Sequence[str], rows: Iterable[Iterable[object]]) -> list[str]:
    """The lines of a markdown table: header, separator, one line per row (cells already formatted)."""
    return [table_row(headers), "|" + "---|" * len(headers), *(table_row(row) for row in rows)]


def append_results(section_markdown: str, path: Path = RESULTS) -> None:
    """Append a section (it should start with a blank line and end with a newline) to RESULTS.md."""
    with path.open("a") as results:
        results.write(section_markdown)
    print(f"appended to {path}")


def publish(section_markdown: str, *, append: bool, path: Path = RESULTS) -> None:
    """Print a section, and append it to RESULTS.md unless the run said --no-append."""
    print(section_markdown)
    if append:
        append_results(section_markdown, path)
