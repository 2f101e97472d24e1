"""Child processes of the stack: each in its own process group, logs forwarded with a prefix, and
stopped with SIGTERM to the whole group, then SIGKILL after a grace period (no orphans). A child
that died can be started again (same command and environment, a new process)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

PR_SET_PDEATHSIG = 1
COLORS = ("\033[36m", "\033[35m", "\033[33m", "\033[32m", "\033[34m", "\033[31m")
RESET = "\033[0m"


def _die_with_parent() -> None:
    """Runs in the child before exec: on Linux, get SIGTERM if the launcher dies without cleaning up."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """One running service."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    color: str = ""
    process: subprocess.Popen[bytes] | None = None
    _pump: threading.Thread | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else -1

    def start(self, out: IO[str], lock: threading.Lock) -> None:
        self.process = subprocess.Popen(
            list(self.argv),
            env=dict(self.env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C reaches the launcher only
            preexec_fn=_die_with_parent,
        )
        self._pump = threading.Thread(target=self._forward, args=(out, lock), name=f"log-{self.name}", daemon=True)
        self._pump.start()

    def _forward(self, out: IO[str], lock: threading.Lock) -> None:
        assert self.process is not None and self.process.stdout is not None
        prefix = f"{self.color}{self.name:>8} |{RESET if self.color else ''} "
        for raw in iter(self.process.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with lock:
                out.write(prefix + line + "\n")
                out.flush()

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def reap(self) -> None:
        """After the child exited: kill what is left of its process group, finish forwarding its log."""
        if self.process is None:
            return
        _signal_group(self.process.pid, signal.SIGKILL)
        if self._pump is not None:
            self._pump.join(timeout=2)

    def terminate(self) -> None:
        """SIGTERM to the child's whole process group."""
        if self.process is not None and self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)

    def wait_stopped(self, deadline: float) -> None:
        """Wait until deadline (time.monotonic()), then SIGKILL the group; reap the child."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        # Grandchildren left in the group go too.
        _signal_group(self.process.pid, signal.SIGKILL)
        if self._pump is not None:
            self._pump.join(timeout=2)


def describe_exit(code: int) -> str:
    """'code 1', or 'signal SIGKILL' for a child killed by a signal (negative return codes)."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class ChildGroup:
    """The children in start order; stop_all() stops them in reverse order."""

    def __init__(self, out: IO[str], colors: bool) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._colors = colors
        self.children: list[Child] = []

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Child:
        color = COLORS[len(self.children) % len(COLORS)] if self._colors else ""
        child = Child(name=name, argv=argv, env=env, color=color)
        child.start(self._out, self._lock)
        self.children.append(child)
        return child

    def say(self, text: str) -> None:
        with self._lock:
            self._out.write(text + "\n")
            self._out.flush()

    def restart(self, child: Child) -> None:
        """Start a child that died again: a new process, same command, environment and log prefix."""
        child.start(self._out, self._lock)

    def first_exited(self) -> Child | None:
        return next((c for c in self.children if c.exit_code() is not None), None)

    def stop_all(self, grace_s: float, on_stop: Callable[[Child], None] | None = None) -> None:
        """SIGTERM to every child (last started first), then wait for all of them together for up to
        grace_s before SIGKILL."""
        for child in reversed(self.children):
            if on_stop is not None:
                on_stop(child)
            child.terminate()
        deadline = time.monotonic() + grace_s
        for child in reversed(self.children):
            child.wait_stopped(deadline)

    def pids(self) -> dict[str, int]:
        return {c.name: c.pid for c in self.children}
