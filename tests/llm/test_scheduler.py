"""Concurrency slots, the bounded FIFO queue, RESOURCE_EXHAUSTED, and cancelled waiters."""

from __future__ import annotations

import asyncio

import pytest
from ivl_llm.scheduler import Scheduler
from ivl_proto.errors import ErrorCode, ServingError


async def test_slots_then_queue_then_resource_exhausted():
    scheduler = Scheduler(max_concurrency=2, max_queue=1)
    a = await scheduler.acquire()
    await scheduler.acquire()
    waiter = asyncio.create_task(scheduler.acquire())
    await asyncio.sleep(0)
    assert (scheduler.active, scheduler.waiting) == (2, 1)
    with pytest.raises(ServingError) as caught:
        await scheduler.acquire()
    assert caught.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "2 request(s) generating (limit 2) and 1 waiting (queue limit 1)" in caught.value.message
    a.release()
    a.release()  # idempotent: must not free a second slot
    third = await asyncio.wait_for(waiter, 1)
    assert (scheduler.active, scheduler.waiting) == (2, 0)
    third.release()
    assert scheduler.active == 1


async def test_waiters_are_served_in_order():
    scheduler = Scheduler(max_concurrency=1, max_queue=3)
    first = await scheduler.acquire()
    order: list[int] = []

    async def wait(n: int) -> None:
        slot = await scheduler.acquire()
        order.append(n)
        slot.release()

    tasks = [asyncio.create_task(wait(n)) for n in range(3)]
    await asyncio.sleep(0)
    first.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert scheduler.active == 0


async def test_a_cancelled_waiter_leaves_the_queue():
    scheduler = Scheduler(max_concurrency=1, max_queue=1)
    held = await scheduler.acquire()
    waiter = asyncio.create_task(scheduler.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert scheduler.waiting == 0
    held.release()
    assert scheduler.active == 0
    (await scheduler.acquire()).release()


async def test_zero_queue_rejects_at_once():
    scheduler = Scheduler(max_concurrency=1, max_queue=0)
    await scheduler.acquire()
    with pytest.raises(ServingError, match="queue limit 0"):
        await scheduler.acquire()
