"""What the scale-out tests and bench/bench_scale_out.py share: the vision service's own encode counter,
a background chat load, one chat in a thread, and the 2-gateways x 8-requests single-flight round.

    with Load(gateway.http_url, clients=2).running() as load:   # image chats, a new image each
        load.wait_for(6); ...; load.outcomes                     # (started, ended, status, detail) each
    encodes, lock_waits = eight_requests_for_one_new_image(backend, [gateway_a, gateway_b], freeze=True)
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from ivl_proto.grpc_runtime import message_size_options
from ivl_proto.vision.v1 import vision_pb2, vision_pb2_grpc
from support.load_client import chat_body, unique_png
from support.waiting import wait_until

_seeds = itertools.count(400_000)


def new_image(width: int = 160, height: int = 120) -> bytes:
    return unique_png(next(_seeds), width, height)


def images_seen(address: str) -> int:
    """The vision service's own count of images submitted to its encoder since it started."""
    with grpc.insecure_channel(address, options=message_size_options()) as channel:
        info = vision_pb2_grpc.VisionEncoderStub(channel).Info(vision_pb2.InfoRequest(), timeout=10)
    return int(info.batching.requests)


@dataclass
class Outcome:
    started: float
    ended: float
    status: int  # 0: no HTTP answer
    detail: str


def post_chat(url: str, images: list[bytes] | None, timeout_s: float = 120, max_tokens: int = 1) -> Outcome:
    body = chat_body("What is this?", images, max_tokens=max_tokens, stream=False)
    started = time.monotonic()
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout_s)
        status, detail = response.status_code, response.text[:300]
    except httpx.HTTPError as error:
        status, detail = 0, repr(error)
    return Outcome(started, time.monotonic(), status, detail)


def chat_in_thread(url: str, image: bytes, results: list[Outcome], timeout_s: float = 120) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(post_chat(url, [image], timeout_s)), daemon=True)
    thread.start()
    return thread


class Load:
    """`clients` threads sending chats (images new each time, so each one is encoded) until stopped."""

    def __init__(self, url: str, clients: int = 2, images: bool = True, max_tokens: int = 1) -> None:
        self._url = url
        self._images = images
        self._max_tokens = max_tokens
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        while not self._stop.is_set():
            outcome = post_chat(self._url, [new_image()] if self._images else None, 60, self._max_tokens)
            with self._lock:
                self.outcomes.append(outcome)

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def wait_for(self, more: int, timeout_s: float = 90) -> None:
        target = self.count() + more
        wait_until(lambda: self.count() >= target, timeout_s, f"{more} more requests")

    @contextlib.contextmanager
    def running(self) -> Iterator[Load]:
        for thread in self._threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in self._threads:
                thread.join(90)


def _total(gateways: list[Any], name: str) -> float:
    return sum(g.metric(name) for g in gateways)


def eight_requests_for_one_new_image(backend: Any, gateways: list[Any], *, freeze: bool = True) -> tuple[int, float]:
    """4 requests for one new image to each of two gateway processes at once; returns the encodes of it (the
    vision service's own count) and the images that waited on another gateway's Redis lock. With `freeze`
    the vision service is stopped (SIGSTOP) until every request is inside a gateway, so all 8 are certainly
    concurrent; without it they are sent together and race as they will."""
    for gateway in gateways:  # gateways that have served before (connected to the vision service)
        warm = post_chat(gateway.http_url, [new_image(120, 90)])
        assert warm.status == 200, warm
    image = new_image(200, 150)
    seen = images_seen(backend.vision.address)
    waits = _total(gateways, "vision_cache_singleflight_waits_total")
    lock_waits = _total(gateways, "vision_cache_lock_waits_total")
    results: list[Outcome] = []
    if freeze:
        backend.vision.pause()
    try:
        threads = [chat_in_thread(gateways[i % 2].http_url, image, results) for i in range(8)]
        if freeze:  # every request is in: 3 in-process waiters per gateway
            try:
                wait_until(lambda: _total(gateways, "vision_cache_singleflight_waits_total") == waits + 6, 60,
                           "3 in-process single-flight waiters on each gateway")
            except AssertionError as error:  # say where each gateway's requests are (a flaky CI failure once)
                where = [(g.metric("vision_cache_singleflight_waits_total"),
                          g.metric("gateway_requests_in_flight", api="http"), g.metric("gateway_http_connections"))
                         for g in gateways]
                logs = ["\n".join(line for line in g.log_text().splitlines() if "ivl_gateway.access" not in line)[-3000:]
                        for g in gateways]
                raise AssertionError(f"{error}; per gateway (waiters, chats in flight, HTTP connections): "
                                     f"{where}; answers so far: {results}; gateway logs: {logs}") from None
            time.sleep(0.5)  # both owners have claimed the lock (or, without it, sent their EncodeImages)
    finally:
        if freeze:
            backend.vision.resume()
    for thread in threads:
        thread.join(120)
    assert [r.status for r in results] == [200] * 8, results
    return images_seen(backend.vision.address) - seen, _total(gateways, "vision_cache_lock_waits_total") - lock_waits
