"""Start a real LLM gRPC server (ivl.llm.v1) on a free loopback port, for tests of any part.

Two ways, the same server (real checkpoint on disk, real grpc.aio server, health SERVING on entry):

    # async tests (pytest-asyncio): the server runs in the test's own event loop
    async with running_llm_server(ckpt_path, max_concurrency=1, max_queue=0) as (address, server):
        async with grpc.aio.insecure_channel(address, options=message_size_options()) as channel:
            stub = llm_pb2_grpc.LanguageModelStub(channel)
            ...

    # sync tests, or fixtures shared across tests / event loops (module or session scope):
    # the server runs in a background thread with its own event loop
    with llm_server_in_thread(ckpt_path) as (address, server):
        ...  # any client: sync grpc, grpc.aio in another loop, the gateway under test

`address` is "127.0.0.1:<port>". `server` is the ivl_llm.server.LLMServer; from another thread only
read it (server.service.scheduler.active / .waiting, server.port), never call its coroutines.
Keyword overrides are LLMSettings fields (max_concurrency=..., max_queue=..., warmup=False, ...).
`service=` passes a ready-made ivl_llm.service.LLMService (e.g. one with a fake backend);
`wait_ready=False` returns right after the port is bound, while the model is still loading.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from ivl_llm.server import LLMServer, build_server
from ivl_llm.service import LLMService
from ivl_llm.settings import LLMSettings
from support.in_thread import async_context_in_thread

READY_TIMEOUT_S = 120.0


def server_settings(model_path: str | Path, **overrides: Any) -> LLMSettings:
    """Settings for a test server: loopback, port 0, short grace, the given overrides."""
    fields: dict[str, Any] = {"model_path": str(model_path), "host": "127.0.0.1", "port": 0, "grace_s": 1.0}
    fields.update(overrides)
    return LLMSettings(**fields)


@contextlib.asynccontextmanager
async def running_llm_server(
    model_path: str | Path,
    *,
    service: LLMService | None = None,
    wait_ready: bool = True,
    ready_timeout_s: float = READY_TIMEOUT_S,
    **overrides: Any,
) -> AsyncIterator[tuple[str, LLMServer]]:
    """Async context manager: a started server in the running loop; stopped (grace 0) on exit."""
    server = build_server(server_settings(model_path, **overrides), service)
    await server.start()
    try:
        if wait_ready:
            await server.wait_ready(ready_timeout_s)
        yield server.address, server
    finally:
        await server.stop(0)


@contextlib.contextmanager
def llm_server_in_thread(
    model_path: str | Path, *, ready_timeout_s: float = READY_TIMEOUT_S, **overrides: Any
) -> Iterator[tuple[str, LLMServer]]:
    """Sync context manager: the server runs in a daemon thread with its own loop until exit."""
    with async_context_in_thread(
        lambda: running_llm_server(model_path, ready_timeout_s=ready_timeout_s, **overrides), "LLM server", ready_timeout_s
    ) as running:
        yield running
