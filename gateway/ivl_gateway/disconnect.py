"""Racing a handler against the client going away, as vLLM's `with_cancellation` does: the ASGI
`http.disconnect` message is awaited next to the work (no polling); whichever comes first wins, and a client
that leaves cancels the work (which cancels the downstream gRPC calls and frees the LLM slot)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the work was done (the work was cancelled)."""


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client has gone (request body messages that still arrive are skipped)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """The work's result; raises ClientGone (after cancelling the work) if the client leaves first. The
    work's own exception is raised as it is."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
    if not task.done():  # the client went away first
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientGone
    return task.result()
