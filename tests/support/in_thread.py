"""Run an async context manager (a test server) in a daemon thread with its own event loop, for sync tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def async_context_in_thread(
    open_context: Callable[[], contextlib.AbstractAsyncContextManager[T]], what: str, ready_timeout_s: float
) -> Iterator[T]:
    """Enter `open_context()` inside a new loop in a daemon thread; yield what it yields; exit it on exit.

    A failure while entering is raised here as RuntimeError naming `what`; a start slower than
    ready_timeout_s (+10 s) as TimeoutError.
    """
    started = threading.Event()
    state: dict[str, Any] = {}

    async def run() -> None:
        state["loop"] = asyncio.get_running_loop()
        state["stop"] = asyncio.Event()
        try:
            async with open_context() as value:
                state["value"] = value
                started.set()
                await state["stop"].wait()
        except BaseException as error:
            state["error"] = error
            raise
        finally:
            started.set()

    def thread_main() -> None:
        with contextlib.suppress(BaseException):
            asyncio.run(run())

    thread = threading.Thread(target=thread_main, name=f"{what}-test-thread", daemon=True)
    thread.start()
    if not started.wait(ready_timeout_s + 10):
        raise TimeoutError(f"the {what} did not become ready in {ready_timeout_s} s")
    if "error" in state:
        thread.join(10)
        raise RuntimeError(f"the {what} failed to start: {state['error']!r}") from state["error"]
    try:
        yield state["value"]
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)
