"""Image attacks on a running stack (a ProcessBackend), measured as a normal user and an operator see them.

Each attack sends hostile image requests over the OpenAI HTTP API — some clients wait for the answer,
some hang up after `hangup_after_s`, as a shared-link visitor may — while a normal user keeps sending
small new images (each a cache miss, so each needs the vision service). It reports the attack requests'
statuses and messages, the normal user's latencies before and during the attack, the RSS of every service
(the vision service counted with its decode workers) at the start, at the peak and after the attack, and
the CPU the vision service spent once every attacker had gone. tests/hostile/test_vision_attacks.py
asserts on the reports; bench/bench_hostile_vision.py prints them for a before/after table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from support.hostile_images import png_bomb, progressive_jpeg_bomb
from support.load_client import chat_body, unique_png
from support.service_processes import ProcessBackend, child_pids, cpu_seconds, tree_rss_bytes

HANGUP = 0  # the status recorded for a client that hung up


@dataclass(frozen=True)
class Attack:
    name: str
    images: Callable[[], list[bytes]]  # one hostile image per attacking request
    hangup_after_s: float | None = None  # None: every attacker waits for its answer
    waiting_attackers: int = 0  # with hangup_after_s: how many of the requests wait anyway


def attacks() -> dict[str, Attack]:
    """The attacks; every attacking request sends different bytes (no cache or single flight shares them)."""
    return {
        "decode_bomb": Attack(  # 6 x a ~100 KB progressive JPEG that takes tens of CPU seconds to decode
            "decode_bomb", lambda: [progressive_jpeg_bomb(4000, 4000, 400 + i) for i in range(6)],
            hangup_after_s=1.0, waiting_attackers=2,
        ),
        "pixel_limit_burst": Attack(  # 4 x a ~160 KB 16-bit PNG of 10000 x ~7999 (just under 80 MP)
            "pixel_limit_burst", lambda: [png_bomb(10000, 7999 - i, complete=True, bit_depth=16) for i in range(4)],
        ),
        "extreme_aspect": Attack(  # 2 x a 1 x ~79,999,999 PNG (under the pixel limit)
            "extreme_aspect", lambda: [png_bomb(1, 79_999_999 - i, complete=True) for i in range(2)],
        ),
        "leave_mid_decode": Attack(  # one bomb whose client hangs up after 1 s
            "leave_mid_decode", lambda: [progressive_jpeg_bomb(4000, 4000, 399)], hangup_after_s=1.0,
        ),
    }


@dataclass
class AttackReport:
    name: str
    statuses: list[int] = field(default_factory=list)  # per attacking request; 0 = hung up
    messages: list[str] = field(default_factory=list)
    baseline_s: float = 0.0  # a normal request before the attack
    normal_s: list[float] = field(default_factory=list)  # normal requests during the attack
    normal_statuses: list[int] = field(default_factory=list)
    rss_start: dict[str, int] = field(default_factory=dict)
    rss_peak: dict[str, int] = field(default_factory=dict)
    rss_after: dict[str, int] = field(default_factory=dict)
    cpu_after_leaving_s: float = 0.0  # vision CPU in the 3 s after the last attacker went away
    alive: bool = True
    seconds: float = 0.0

    @property
    def worst_normal_s(self) -> float:
        return max(self.normal_s, default=0.0)


def _post(url: str, image: bytes, timeout: float, seed: int) -> tuple[int, str]:
    body = chat_body(f"attack {seed}", [image], max_tokens=2, stream=False)
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)
    except httpx.TimeoutException:
        return HANGUP, "hung up"
    except httpx.HTTPError as error:
        return -1, f"transport error: {error}"
    message = ""
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
    return response.status_code, message


def normal_request(url: str, seed: int) -> tuple[int, float]:
    started = time.monotonic()
    status, _ = _post(url, unique_png(seed, 320, 240), 120.0, seed)
    return status, time.monotonic() - started


def _vision_tree_cpu(backend: ProcessBackend) -> float:
    pid = backend.vision.pid
    total = cpu_seconds(pid)
    for child in child_pids(pid):
        try:
            total += cpu_seconds(child)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _rss(backend: ProcessBackend) -> dict[str, int]:
    out = {}
    for service in backend.services:
        if service.alive:
            try:
                out[service.name] = tree_rss_bytes(service.pid)
            except (FileNotFoundError, ProcessLookupError, RuntimeError):
                continue
    return out


def run_attack(backend: ProcessBackend, attack: Attack, seed: int = 1_000, settle_s: float = 3.0) -> AttackReport:
    url = backend.gateway.http_url
    report = AttackReport(attack.name)
    images = attack.images()
    status, report.baseline_s = normal_request(url, seed)
    assert status == 200, f"the stack does not serve a normal request before the attack ({status})"
    report.rss_start = _rss(backend)
    report.rss_peak = dict(report.rss_start)
    done, sampling = threading.Event(), threading.Event()
    results: list[tuple[int, str]] = [(-1, "not sent")] * len(images)

    def sample() -> None:
        while not sampling.is_set():
            for name, value in _rss(backend).items():
                report.rss_peak[name] = max(report.rss_peak.get(name, 0), value)
            time.sleep(0.1)

    def attacker(index: int) -> None:
        waits = attack.hangup_after_s is None or index < attack.waiting_attackers
        timeout = 300.0 if waits else float(attack.hangup_after_s or 1.0)
        results[index] = _post(url, images[index], timeout, seed + 1 + index)

    def normal_user() -> None:
        count = 0
        while not done.is_set():
            count += 1
            status, seconds = normal_request(url, seed + 10_000 + count)
            report.normal_statuses.append(status)
            report.normal_s.append(seconds)
            time.sleep(0.3)

    started = time.monotonic()
    sampler = threading.Thread(target=sample, daemon=True)
    threads = [threading.Thread(target=attacker, args=(i,), daemon=True) for i in range(len(images))]
    sampler.start()
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # the attack is under way when the normal user starts
    user = threading.Thread(target=normal_user, daemon=True)
    user.start()
    for thread in threads:
        thread.join()
    report.seconds = time.monotonic() - started
    done.set()  # the normal user stops with the attack; its last request finishes first
    user.join(timeout=180)
    cpu_before = _vision_tree_cpu(backend)
    time.sleep(settle_s)  # nobody sends anything now: what the vision service still burns is wasted
    report.cpu_after_leaving_s = _vision_tree_cpu(backend) - cpu_before
    sampling.set()
    sampler.join(timeout=5)
    report.statuses = [status for status, _ in results]
    report.messages = [message for _, message in results]
    report.rss_after = _rss(backend)
    report.alive = all(service.alive for service in backend.services)
    return report
