"""Start a real vision encoder gRPC server on a free loopback port, for tests of any part.

Two ways, the same server (real checkpoint on disk, real grpc.aio server, health SERVING on entry):

    # async tests (pytest-asyncio): the server runs in the test's own event loop
    async with running_vision_server(ckpt_path, max_batch_tiles=8) as (address, server):
        async with grpc.aio.insecure_channel(address, options=message_size_options()) as channel:
            ...

    # sync tests, or fixtures shared across tests / event loops (module or session scope):
    # the server runs in a background thread with its own event loop
    with vision_server_in_thread(ckpt_path) as (address, server):
        ...  # any client: sync grpc, grpc.aio in another loop, another service under test

`address` is "127.0.0.1:<port>". `server` is the ivl_vision.server.VisionServer; from another thread
only read it (server.service.batcher.stats, server.port), never call its coroutines.
Keyword overrides are VisionSettings fields (max_batch_tiles=..., batch_wait_ms=..., warmup=False).
`load=` replaces the model loader (e.g. a slow one to observe NOT_SERVING); `wait_ready=False`
returns right after the port is bound, while the model is still loading.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from ivl_vision.server import LoadEncoder, VisionServer, build_server, load_encoder
from ivl_vision.settings import VisionSettings
from support.in_thread import async_context_in_thread

READY_TIMEOUT_S = 120.0


def server_settings(model_path: str | Path, **overrides: Any) -> VisionSettings:
    """Settings for a test server: loopback, port 0, short grace, 2 decode workers, the given overrides."""
    fields: dict[str, Any] = {
        "model_path": Path(model_path), "host": "127.0.0.1", "port": 0, "grace_s": 1.0, "preprocess_workers": 2,
    }
    fields.update(overrides)
    return VisionSettings(**fields)


@contextlib.asynccontextmanager
async def running_vision_server(
    model_path: str | Path,
    *,
    load: LoadEncoder = load_encoder,
    wait_ready: bool = True,
    ready_timeout_s: float = READY_TIMEOUT_S,
    **overrides: Any,
) -> AsyncIterator[tuple[str, VisionServer]]:
    """Async context manager: a started server in the running loop; stopped (grace 0) on exit."""
    server = build_server(server_settings(model_path, **overrides), load)
    await server.start()
    try:
        if wait_ready:
            await server.wait_ready(ready_timeout_s)
        yield server.address, server
    finally:
        await server.stop(0)


@contextlib.contextmanager
def vision_server_in_thread(
    model_path: str | Path,
    *,
    load: LoadEncoder = load_encoder,
    ready_timeout_s: float = READY_TIMEOUT_S,
    **overrides: Any,
) -> Iterator[tuple[str, VisionServer]]:
    """Sync context manager: the server runs in a daemon thread with its own loop until exit."""
    with async_context_in_thread(
        lambda: running_vision_server(model_path, load=load, ready_timeout_s=ready_timeout_s, **overrides),
        "vision server",
        ready_timeout_s,
    ) as running:
        yield running
