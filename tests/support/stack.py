"""The whole backend for tests: redis-server + vision + LLM + gateway on loopback, from a checkpoint path.

In-process (fast; the services run in one background thread with its own event loop, so the stack
can be shared by sync and async tests and by module/session fixtures):

    with running_stack(ckpt_path) as stack:
        stack.http_url          # "http://127.0.0.1:PORT"  (OpenAI base_url = stack.http_url + "/v1")
        stack.grpc_address      # "127.0.0.1:PORT"         (ivl.gateway.v1.Chat)
        stack.redis.url         # the real redis-server (tests.support.redis_server.RedisServer)
        stack.vision_addresses, stack.llm_addresses
        stack.stop_vision(0); stack.start_vision(0)        # same port: outage + recovery tests
        stack.run(coro)         # run a coroutine in the stack's loop (e.g. to read server state)

Options: vision_replicas=N, llm_replicas=N, redis=False (no cache), gateway=dict of GatewaySettings
overrides, vision=dict of VisionSettings overrides, llm=dict of LLMSettings overrides,
tracer_providers={"gateway"|"vision"|"llm": TracerProvider} (OpenTelemetry spans of each service).

As subprocesses (what a user runs: `python -m ivl_vision`, `python -m ivl_llm`, `python -m ivl_gateway`),
for end-to-end and load tests:

    with running_stack_processes(ckpt_path) as stack:   # same attributes (no stop_/start_ helpers)
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from support.redis_server import RedisServer, free_port

T = TypeVar("T")
READY_TIMEOUT_S = 180.0


class Stack:
    def __init__(
        self,
        model_path: str | Path,
        *,
        vision_replicas: int = 1,
        llm_replicas: int = 1,
        redis: bool = True,
        gateway: dict[str, Any] | None = None,
        vision: dict[str, Any] | None = None,
        llm: dict[str, Any] | None = None,
        tracer_providers: dict[str, Any] | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self._tracers = tracer_providers or {}
        self.redis: RedisServer | None = RedisServer(maxmemory="128mb") if redis else None
        self._gateway_overrides = gateway or {}
        self._vision_overrides = {"warmup": False, **(vision or {})}
        self._llm_overrides = {"warmup": False, **(llm or {})}
        self.vision_ports = [free_port() for _ in range(vision_replicas)]
        self.llm_ports = [free_port() for _ in range(llm_replicas)]
        self.vision_servers: list[Any] = [None] * vision_replicas
        self.llm_servers: list[Any] = [None] * llm_replicas
        self.gateway: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # addresses -----------------------------------------------------------------------------------
    @property
    def vision_addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.vision_ports]

    @property
    def llm_addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.llm_ports]

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.ports.http}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.gateway.ports.grpc}"

    # lifecycle -----------------------------------------------------------------------------------
    def run(self, coro: Coroutine[Any, Any, T], timeout: float = READY_TIMEOUT_S) -> T:
        """Run a coroutine in the stack's event loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> Stack:
        if self.redis is not None:
            self.redis.start()
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def thread_main() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        self._thread = threading.Thread(target=thread_main, name="ivl-test-stack", daemon=True)
        self._thread.start()
        ready.wait(10)
        try:
            self.run(self._start_all())
        except BaseException:
            self.stop()
            raise
        return self

    async def _start_all(self) -> None:
        await asyncio.gather(
            *(self._start_vision(i) for i in range(len(self.vision_ports))),
            *(self._start_llm(i) for i in range(len(self.llm_ports))),
        )
        from ivl_gateway.server import build_gateway

        self.gateway = build_gateway(self.gateway_settings(), self._tracers.get("gateway"))
        await self.gateway.start()
        await self.gateway.wait_ready(READY_TIMEOUT_S)

    def gateway_settings(self, **overrides: Any) -> Any:
        """GatewaySettings pointing at this stack's services (as the stack's own gateway), with overrides."""
        from ivl_gateway.settings import GatewaySettings

        fields: dict[str, Any] = {
            "vision_addresses": self.vision_addresses,
            "llm_addresses": self.llm_addresses,
            "redis_url": self.redis.url if self.redis is not None else "",
            "grpc_host": "127.0.0.1", "grpc_port": 0, "http_host": "127.0.0.1", "http_port": 0,
            "dns_refresh_s": 1.0, "replica_backoff_s": 0.5, "redis_retry_s": 0.5, "grace_s": 0.5,
        }
        fields.update(self._gateway_overrides)
        fields.update(overrides)
        return GatewaySettings(**fields)

    @contextlib.contextmanager
    def extra_gateway(self, **overrides: Any) -> Iterator[Any]:
        """Another gateway (own ports, given settings) in front of the same services; yields it
        (`.ports.http`, `.ports.grpc`, `.metrics`)."""
        from ivl_gateway.server import build_gateway

        settings = self.gateway_settings(**overrides)

        async def build_and_start() -> Any:  # grpc.aio objects belong to the loop they are made in
            gateway = build_gateway(settings)
            await gateway.start()
            await gateway.wait_ready(READY_TIMEOUT_S)
            return gateway

        gateway = self.run(build_and_start())
        try:
            yield gateway
        finally:
            self.run(gateway.stop(0))

    async def _start_vision(self, index: int) -> None:
        from ivl_vision.server import build_server
        from support.vision_server import server_settings

        server = build_server(server_settings(self.model_path, port=self.vision_ports[index], **self._vision_overrides),
                              tracer_provider=self._tracers.get("vision"))
        await server.start()
        await server.wait_ready(READY_TIMEOUT_S)
        self.vision_servers[index] = server

    async def _start_llm(self, index: int) -> None:
        from ivl_llm.server import build_server
        from ivl_llm.settings import LLMSettings

        fields: dict[str, Any] = {
            "model_path": str(self.model_path), "host": "127.0.0.1", "port": self.llm_ports[index], "grace_s": 0.5,
        }
        fields.update(self._llm_overrides)
        server = build_server(LLMSettings(**fields), tracer_provider=self._tracers.get("llm"))
        await server.start()
        await server.wait_ready(READY_TIMEOUT_S)
        self.llm_servers[index] = server

    async def _stop_vision(self, index: int) -> None:
        server, self.vision_servers[index] = self.vision_servers[index], None
        if server is not None:
            await server.stop(0)

    async def _stop_llm(self, index: int) -> None:
        server, self.llm_servers[index] = self.llm_servers[index], None
        if server is not None:
            await server.stop(0)

    def stop_vision(self, index: int = 0) -> None:
        self.run(self._stop_vision(index))

    def start_vision(self, index: int = 0) -> None:
        self.run(self._start_vision(index))

    def stop_llm(self, index: int = 0) -> None:
        self.run(self._stop_llm(index))

    def start_llm(self, index: int = 0) -> None:
        self.run(self._start_llm(index))

    async def _stop_all(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop(0)
        await asyncio.gather(
            *(self._stop_vision(i) for i in range(len(self.vision_servers))),
            *(self._stop_llm(i) for i in range(len(self.llm_servers))),
            return_exceptions=True,
        )

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.run(self._stop_all(), timeout=60)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        if self.redis is not None:
            self.redis.stop()


@contextlib.contextmanager
def running_stack(model_path: str | Path, **options: Any) -> Iterator[Stack]:
    stack = Stack(model_path, **options)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


class ProcessStack:
    """The same backend as real processes (`python -m ...`), for end-to-end and load tests."""

    def __init__(self, model_path: str | Path, *, redis: bool = True, env: dict[str, str] | None = None) -> None:
        self.model_path = Path(model_path)
        self.redis: RedisServer | None = RedisServer(maxmemory="128mb") if redis else None
        self.vision_addresses = [f"127.0.0.1:{free_port()}"]
        self.llm_addresses = [f"127.0.0.1:{free_port()}"]
        self._http_port = free_port()
        self._grpc_port = free_port()
        self._env = env or {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, Path] = {}  # stderr of each process (a full pipe would block a chatty one)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self._http_port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self._grpc_port}"

    def _spawn(self, name: str, module: str, env: dict[str, str]) -> None:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env, **self._env}
        self._logs[name] = Path(tempfile.mkstemp(prefix=f"ivl-{name}-", suffix=".log")[1])
        with self._logs[name].open("wb") as log_file:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", module], env=full_env, stdout=subprocess.DEVNULL, stderr=log_file,
                start_new_session=True,
            )

    def start(self) -> ProcessStack:
        if self.redis is not None:
            self.redis.start()
        vision_port = self.vision_addresses[0].rsplit(":", 1)[1]
        llm_port = self.llm_addresses[0].rsplit(":", 1)[1]
        self._spawn("vision", "ivl_vision", {
            "IVL_VISION_MODEL_PATH": str(self.model_path), "IVL_VISION_HOST": "127.0.0.1",
            "IVL_VISION_PORT": vision_port, "IVL_VISION_TORCH_THREADS": "1",
        })
        self._spawn("llm", "ivl_llm", {
            "IVL_LLM_MODEL_PATH": str(self.model_path), "IVL_LLM_HOST": "127.0.0.1", "IVL_LLM_PORT": llm_port,
            "IVL_LLM_TORCH_THREADS": "1",
        })
        self._spawn("gateway", "ivl_gateway", {
            "IVL_GATEWAY_VISION_ADDRESSES": self.vision_addresses[0],
            "IVL_GATEWAY_LLM_ADDRESSES": self.llm_addresses[0],
            "IVL_GATEWAY_REDIS_URL": self.redis.url if self.redis is not None else "",
            "IVL_GATEWAY_GRPC_HOST": "127.0.0.1", "IVL_GATEWAY_GRPC_PORT": str(self._grpc_port),
            "IVL_GATEWAY_HTTP_HOST": "127.0.0.1", "IVL_GATEWAY_HTTP_PORT": str(self._http_port),
            "IVL_GATEWAY_DNS_REFRESH_S": "1.0",
        })
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    err = self._logs[name].read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} exited with {process.returncode}:\n{err}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.http_url}/ready", timeout=5).status_code == 200:
                    return
            time.sleep(0.3)
        raise TimeoutError(f"the stack was not ready within {timeout_s} s")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        for path in self._logs.values():
            path.unlink(missing_ok=True)
        if self.redis is not None:
            self.redis.stop()


@contextlib.contextmanager
def running_stack_processes(model_path: str | Path, **options: Any) -> Iterator[ProcessStack]:
    stack = ProcessStack(model_path, **options)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
