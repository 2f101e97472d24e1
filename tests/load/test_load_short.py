"""A bounded load run through the real stack (redis-server, vision and LLM gRPC services, gateway):
concurrent OpenAI-HTTP streaming clients, a mix of new images, repeated images and text-only chats.

Asserted: every request is answered (200 + final chunk) or refused with a clear status (here: the
LLM's bounded queue -> 429 resource_exhausted); never a transport error, a 5xx or a stream without an
end. Afterwards nothing leaks: the gateway counted every request as finished (none in flight), the
LLM service's slots and queue are empty, the vision batcher holds no tiles, no single-flight entry or
background encode is left, the stack's event loop is back to its task count, and the memory of the
process holding the stack grows by less than a stated bound over a second identical round.

The longer soak of the same mix is `bench/bench_soak.py`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from support.load_client import chat_body, percentile, run_clients, unique_png
from support.service_processes import rss_bytes
from support.stack import running_stack

pytestmark = pytest.mark.slow

CLIENTS = 8
REQUESTS = 24  # per round; two rounds
RSS_GROWTH_LIMIT = 48 * 2**20  # second round over the first: allocator noise, not a per-request leak
REPEATED = [unique_png(900 + i, 320, 240) for i in range(3)]
T = TypeVar("T")


@pytest.fixture(scope="module")
def stack(tiny_original):
    with running_stack(
        tiny_original,
        gateway={"default_max_tiles": 2},
        llm={"context_length": 8192, "max_concurrency": 2, "max_queue": 1},
        vision={"max_batch_tiles": 16},
    ) as running:
        yield running


def make_body(round_index: int):
    def body(i: int) -> dict:
        kind = i % 3
        if kind == 0:  # a new image
            return chat_body(f"new {i}", [unique_png(round_index * 10_000 + i, 320, 240)])
        if kind == 1:  # one of three images every round repeats
            return chat_body(f"again {i}", [REPEATED[i % len(REPEATED)]])
        return chat_body(f"just text {i}")

    return body


def requests_counted(stack) -> float:
    registry = stack.gateway.metrics.registry
    return sum(
        sample.value
        for family in registry.collect() if family.name == "gateway_requests"
        for sample in family.samples if sample.name == "gateway_requests_total"
    )


def in_flight(stack) -> dict[str, float]:
    """gateway_requests_in_flight per API (incremented/decremented around every chat turn)."""
    registry = stack.gateway.metrics.registry
    return {api: registry.get_sample_value("gateway_requests_in_flight", {"api": api}) for api in ("http", "grpc")}


def leftovers(stack) -> dict[str, int]:
    chat_service = stack.gateway.chat_service
    scheduler = stack.llm_servers[0].service.scheduler
    batcher = stack.vision_servers[0].service.batcher
    return {
        "llm_active": scheduler.active,
        "llm_waiting": scheduler.waiting,
        "vision_queued_tiles": batcher.queued_tiles,
        "singleflight": len(chat_service.resolver._flight),
        "background_encodes": len({id(e) for e in chat_service.resolver._encodes.values()}),
    }


async def watch_in_flight(stack, peak: list[float], run: Coroutine[Any, Any, T]) -> T:
    """Run the clients while sampling gateway_requests_in_flight{api=http} into `peak`."""
    task = asyncio.ensure_future(run)
    while not task.done():
        peak.append(in_flight(stack)["http"])
        await asyncio.wait({task}, timeout=0.02)
    return task.result()


async def loop_tasks(stack) -> int:
    return len(asyncio.all_tasks())


def settle(stack, baseline_tasks: int, timeout_s: float = 5.0) -> tuple[dict[str, int], int]:
    deadline = time.monotonic() + timeout_s
    while True:
        left, tasks = leftovers(stack), stack.run(loop_tasks(stack))
        if (not any(left.values()) and tasks <= baseline_tasks) or time.monotonic() > deadline:
            return left, tasks
        time.sleep(0.05)


def test_bounded_load_everything_answered_or_refused_and_nothing_leaks(stack):
    warm = asyncio.run(run_clients(stack.http_url, 1, 3, make_body(99)))
    assert all(o.ok for o in warm), [(o.status, o.error_code, o.error_message) for o in warm]
    baseline_tasks = stack.run(loop_tasks(stack))
    rss: list[int] = []
    for round_index in range(2):
        counted_before = requests_counted(stack)
        peak: list[float] = []
        outcomes = asyncio.run(watch_in_flight(stack, peak, run_clients(stack.http_url, CLIENTS, REQUESTS,
                                                                        make_body(round_index))))
        assert 1 <= max(peak) <= CLIENTS, peak  # the gauge saw the run, never more turns than clients
        assert len(outcomes) == REQUESTS
        bad = [(i, o.status, o.error_code, o.error_message) for i, o in enumerate(outcomes)
               if not (o.ok or (o.refused_clearly and o.error_code == "resource_exhausted"))]
        assert not bad, bad
        refused = [o for o in outcomes if not o.ok]
        assert all(o.status == 429 and "busy" in o.error_message for o in refused)
        answered = [o for o in outcomes if o.ok]
        assert len(answered) >= REQUESTS // 4, f"only {len(answered)} of {REQUESTS} answered"
        repeated_hits = [o.cache_hits for i, o in enumerate(outcomes) if i % 3 == 1 and o.ok]
        assert repeated_hits and sum(repeated_hits) >= len(repeated_hits) - len(REPEATED)
        assert all(o.ttft_s is not None for o in answered)
        print(f"round {round_index}: {len(answered)} answered, {len(refused)} refused (429), "
              f"p50 TTFT {percentile([o.ttft_s for o in answered], 50):.3f} s")

        left, tasks = settle(stack, baseline_tasks)
        assert not any(left.values()), left
        assert tasks <= baseline_tasks, f"{tasks} tasks in the stack's loop after the run, {baseline_tasks} before"
        # Every request finished at the gateway (counted with its outcome): none is still in flight.
        assert requests_counted(stack) - counted_before == REQUESTS
        assert in_flight(stack) == {"http": 0, "grpc": 0}, in_flight(stack)
        rss.append(rss_bytes(os.getpid()))
    growth = rss[1] - rss[0]
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / 2**20:.1f} MiB in the second round"
