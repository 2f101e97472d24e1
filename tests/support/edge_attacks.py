"""Attacks on the gateway's public edges, over real sockets on loopback (tests/hostile/test_hostile_edges.py
and bench/bench_hostile_edges.py). Standard library + httpx + grpc only, so the bench can point them at
any checkout's gateway process.

Each attack returns what a person would look at: the status the attacker got (or "closed after N s"),
and how long it took. `NormalUser` measures the latency of a small chat request while an attack runs;
`RssSampler` the peak RSS of a process.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
from support.service_processes import rss_bytes

HOST = "127.0.0.1"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Outcome:
    """What one attacking connection saw: the HTTP status it got (0 = none), and when its connection ended."""

    status: int = 0
    closed_after_s: float | None = None
    sent: int = 0
    note: str = ""

    def describe(self) -> str:
        closed = f"closed after {self.closed_after_s:.1f} s" if self.closed_after_s is not None else "still open"
        return f"{self.status or 'no response'}, {closed}"


def _status_of(data: bytes) -> int:
    if data.startswith(b"HTTP/1."):
        with contextlib.suppress(ValueError, IndexError):
            return int(data.split(b" ", 2)[1])
    return 0


def _read_answer(sock: socket.socket, outcome: Outcome, started: float, until: float) -> None:
    """Read whatever the server sends until it closes or `until` (monotonic) passes."""
    buffer = b""
    while time.monotonic() < until:
        sock.settimeout(max(0.05, min(0.5, until - time.monotonic())))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            outcome.closed_after_s = time.monotonic() - started
            break
        if not data:
            outcome.closed_after_s = time.monotonic() - started
            break
        buffer += data
        outcome.status = outcome.status or _status_of(buffer)
    outcome.status = outcome.status or _status_of(buffer)


def trickle(port: int, head: bytes, pieces: Iterator[bytes], interval_s: float, duration_s: float) -> Outcome:
    """Send `head`, then one piece every `interval_s`, watching for the server's answer/close, for at most
    `duration_s`. Models slow headers (head = partial request line) and slow or half-sent bodies."""
    outcome = Outcome()
    started = time.monotonic()
    deadline = started + duration_s
    try:
        sock = socket.create_connection((HOST, port), timeout=5)
    except OSError as error:
        return Outcome(note=f"connect failed: {error}")
    with sock:
        try:
            sock.sendall(head)
            outcome.sent += len(head)
        except OSError:
            outcome.closed_after_s = 0.0
            return outcome
        for piece in pieces:
            _read_answer(sock, outcome, started, min(deadline, time.monotonic() + interval_s))
            if outcome.closed_after_s is not None or outcome.status or time.monotonic() >= deadline:
                break
            try:
                sock.sendall(piece)
                outcome.sent += len(piece)
            except OSError:
                outcome.closed_after_s = time.monotonic() - started
                break
        if outcome.closed_after_s is None:  # answered or not: watch for the close
            _read_answer(sock, outcome, started, deadline)
    return outcome


def slow_headers(port: int, interval_s: float, duration_s: float) -> Outcome:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
    return trickle(port, head, (f"X-Slow-{i}: y\r\n".encode() for i in range(10**6)), interval_s, duration_s)


def slow_body(port: int, declared: int, piece: bytes, interval_s: float, duration_s: float,
              stop_after: int | None = None, api_key: str | None = None) -> Outcome:
    """A JSON POST declaring `declared` bytes, then `piece` every interval (at most `stop_after` pieces:
    a half-sent body that then goes silent). With `api_key`, an authenticated (but hostile) client."""
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {declared}\r\n\r\n").encode()

    def pieces() -> Iterator[bytes]:
        count = 0
        while stop_after is None or count < stop_after:
            count += 1
            yield piece
        while True:
            yield b""

    return trickle(port, head, pieces(), interval_s, duration_s)


def run_parallel(count: int, target, *args: object) -> list[Outcome]:  # type: ignore[no-untyped-def]
    results: list[Outcome] = [Outcome()] * count

    def one(i: int) -> None:
        results[i] = target(*args)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def open_idle(port: int, count: int) -> list[socket.socket]:
    """`count` TCP connections that never send a byte (a refused/failed connect ends the list early)."""
    sockets: list[socket.socket] = []
    for _ in range(count):
        try:
            sockets.append(socket.create_connection((HOST, port), timeout=5))
        except OSError:
            break
    return sockets


def count_closed(sockets: list[socket.socket]) -> int:
    """How many of these client sockets the server has closed (EOF or reset) by now."""
    closed = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            if sock.recv(1 << 16) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def text_plain_post(url: str, origin: str = "https://evil.example") -> httpx.Response:
    """What a page on another site can send without a CORS preflight: a text/plain POST with JSON in it."""
    body = json.dumps({"messages": [{"role": "user", "content": "hello from another site"}], "max_tokens": 2})
    return httpx.post(f"{url}/v1/chat/completions", content=body, timeout=30,
                      headers={"content-type": "text/plain", "origin": origin})


@dataclass
class NormalUser:
    """A small text chat over HTTP, timed; `latencies` of every call (s) and their statuses."""

    url: str
    api_key: str | None = None
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    def ask(self, timeout_s: float = 120.0) -> float:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
        started = time.perf_counter()
        try:
            status = httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers,
                                timeout=timeout_s).status_code
        except httpx.HTTPError:
            status = 0
        elapsed = time.perf_counter() - started
        self.latencies.append(elapsed)
        self.statuses.append(status)
        return elapsed

    @contextlib.contextmanager
    def asking_during(self, every_s: float = 0.5) -> Iterator[NormalUser]:
        """Keep asking in a thread while the block runs; then `during` holds those calls' latencies."""
        stop = threading.Event()
        first = len(self.latencies)

        def loop() -> None:
            while not stop.is_set():
                self.ask()
                stop.wait(every_s)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(150)
            self.during = list(zip(self.latencies[first:], self.statuses[first:], strict=True))

    during: list[tuple[float, int]] = field(default_factory=list)


class RssSampler:
    """Peak RSS of a process, sampled every `every_s` in a thread while the block runs."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        self.pid = pid
        self.every_s = every_s
        self.before = rss_bytes(pid)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
