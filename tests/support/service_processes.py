"""Each service of the stack as its own OS process, one by one, for fault, load and memory tests/benches.

Unlike support.stack.ProcessStack (all or nothing), every service here can be killed (SIGKILL),
paused (SIGSTOP), resumed and restarted on the same port while the others keep running, and each
process's RSS and CPU time can be read from /proc:

    with process_backend(ckpt_path, gateway={"vision_timeout_s": 3}, vision_replicas=2) as backend:
        backend.gateway.http_url / backend.gateway.grpc_address
        backend.vision.kill(); backend.vision.start(); backend.vision.wait_serving()
        backend.visions[1], backend.llms[0]      # every replica (backend.vision is visions[0])
        backend.new_vision(host="127.0.0.2", port=p)   # one more (not started, not in the gateway's addresses)
    process_backend(ckpt_path, vision_at=[("127.0.0.1", p), ("127.0.0.2", p)])  # replicas like pods: own IPs
        backend.llm.pause(); backend.llm.resume()
        backend.redis.stop(); backend.redis.start()
        backend.gateway.metrics()          # {(name, (("label", "value"), ...)): value} from /metrics
        rss_bytes(backend.vision.pid)

The vision and LLM services may run different checkpoints (`llm_model_path=`), e.g. to test a
hidden-size mismatch. Settings overrides are field names of each service's settings object; they
go in as IVL_<SERVICE>_<FIELD> variables, exactly as a user would set them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support.redis_server import RedisServer, free_port

START_TIMEOUT_S = 180.0
MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def child_pids(pid: int) -> list[int]:
    """Direct children of a live process (e.g. the vision service's decode workers)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(child) for child in text)
    return children


def tree_rss_bytes(pid: int) -> int:
    """RSS of a process and its direct children (a service with its worker processes)."""
    total = rss_bytes(pid)
    for child in child_pids(pid):
        try:
            total += rss_bytes(child)
        except (FileNotFoundError, ProcessLookupError, RuntimeError):
            continue  # a worker that just ended
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _env(prefix: str, overrides: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in overrides.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list | tuple):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value)
        out[f"{prefix}{key.upper()}"] = text
    return out


class ServiceProcess:
    """`python -m MODULE` with IVL_* settings on a fixed loopback port; restartable on that port."""

    def __init__(self, name: str, module: str, env: dict[str, str], port: int, host: str = "127.0.0.1") -> None:
        self.name = name
        self.module = module
        self.env = env
        self.port = port
        self.host = host
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        # stderr goes to a file (a pipe nobody reads would block a chatty process once it is full)
        self.log_path = Path(tempfile.mkstemp(prefix=f"ivl-{name}-", suffix=".log")[1])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> ServiceProcess:
        assert not self.alive, f"{self.name} is already running"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module], env=env, stdout=subprocess.DEVNULL, stderr=log_file,
                start_new_session=True,
            )
        self.starts += 1
        return self

    def log_text(self) -> str:
        """Everything the process wrote to stderr so far (all its starts)."""
        return self.log_path.read_text(errors="replace")

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Wait for grpc.health.v1 SERVING; returns the seconds waited."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        start = time.monotonic()
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() - start < timeout_s:
                self._check_alive()
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - start
                time.sleep(0.1)
        raise TimeoutError(f"{self.name} was not SERVING within {timeout_s} s")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL: the process dies at once, mid-request, without a graceful stop."""
        if self.alive:
            self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the process stays alive, its port accepts connections, nothing answers."""
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


class GatewayProcess(ServiceProcess):
    def __init__(self, env: dict[str, str], grpc_port: int, http_port: int) -> None:
        super().__init__("gateway", "ivl_gateway", env, grpc_port)
        self.http_port = http_port

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return self.address

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Wait for GET /ready == 200 (vision and LLM reachable and compatible)."""
        import httpx

        start = time.monotonic()
        last = "no answer yet"
        while time.monotonic() - start < timeout_s:
            self._check_alive()
            try:
                response = httpx.get(f"{self.http_url}/ready", timeout=5)
            except httpx.HTTPError as error:
                last = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 200:
                    return time.monotonic() - start
                last = f"{response.status_code} {response.text[:2000]}"
            time.sleep(0.1)
        raise TimeoutError(f"the gateway was not ready within {timeout_s} s; /ready said: {last}\n"
                           f"its log ends with:\n{self.log_text()[-3000:]}")

    def ready(self) -> tuple[int, dict[str, Any]]:
        import httpx

        response = httpx.get(f"{self.http_url}/ready", timeout=10)
        return response.status_code, response.json()

    def metrics(self) -> dict[MetricKey, float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.http_url}/metrics", timeout=10).text
        return {  # keyed without model_name (every series carries it: the served model)
            (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


class ProcessBackend:
    """redis-server + vision + LLM + gateway, each a process of its own."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        llm_model_path: str | Path | None = None,
        redis: bool = True,
        gateway: dict[str, Any] | None = None,
        vision: dict[str, Any] | None = None,
        llm: dict[str, Any] | None = None,
        vision_replicas: int = 1,
        llm_replicas: int = 1,
        vision_at: list[tuple[str, int]] | None = None,
        model_env: dict[str, str] | None = None,
    ) -> None:
        self._model_env = model_env or {}  # plain variables of the vision and LLM processes (e.g. OMP_WAIT_POLICY)
        self.redis: RedisServer | None = RedisServer(maxmemory="128mb") if redis else None
        self._model_path = model_path
        self._llm_model_path = llm_model_path or model_path
        self._vision_overrides = vision or {}
        self._llm_overrides = llm or {}
        places = vision_at or [("127.0.0.1", 0)] * vision_replicas  # vision_at: (host, port) of each replica
        self.visions = [self.new_vision(host, port, name="vision" if i == 0 else f"vision-{i + 1}")
                        for i, (host, port) in enumerate(places)]
        self.llms = [self.new_llm(name="llm" if i == 0 else f"llm-{i + 1}") for i in range(llm_replicas)]
        self.vision, self.llm = self.visions[0], self.llms[0]
        self._gateway_overrides = gateway or {}
        self.gateway = self.new_gateway()

    def new_vision(
        self, host: str = "127.0.0.1", port: int | None = None, name: str = "", **overrides: Any
    ) -> ServiceProcess:
        """A vision service process (not started; not one of this backend's gateway addresses)."""
        port = port or free_port()
        return ServiceProcess(name or f"vision-{host}-{port}", "ivl_vision", _env("IVL_VISION_", {
            "model_path": self._model_path, "host": host, "port": port, "torch_threads": 1,
            "warmup": False, "grace_s": 0.5, **self._vision_overrides, **overrides,
        }) | self._model_env, port, host)

    def new_llm(
        self, host: str = "127.0.0.1", port: int | None = None, name: str = "", **overrides: Any
    ) -> ServiceProcess:
        """An LLM service process (not started; not one of this backend's gateway addresses)."""
        port = port or free_port()
        return ServiceProcess(name or f"llm-{host}-{port}", "ivl_llm", _env("IVL_LLM_", {
            "model_path": self._llm_model_path, "host": host, "port": port,
            "torch_threads": 1, "warmup": False, "grace_s": 0.5, **self._llm_overrides, **overrides,
        }) | self._model_env, port, host)

    def new_gateway(self, **overrides: Any) -> GatewayProcess:
        """A gateway process (not started) in front of this backend's services: the backend's gateway
        settings, then `overrides`."""
        grpc_port, http_port = free_port(), free_port()
        return GatewayProcess(_env("IVL_GATEWAY_", {
            "vision_addresses": [v.address for v in self.visions], "llm_addresses": [m.address for m in self.llms],
            "redis_url": self.redis.url if self.redis is not None else "",
            "grpc_host": "127.0.0.1", "grpc_port": grpc_port, "http_host": "127.0.0.1", "http_port": http_port,
            "dns_refresh_s": 1.0, "replica_backoff_s": 0.5, "redis_retry_s": 0.5, "grace_s": 0.5,
            **self._gateway_overrides, **overrides,
        }), grpc_port, http_port)

    @contextlib.contextmanager
    def extra_gateway(self, **overrides: Any) -> Iterator[GatewayProcess]:
        """Another gateway process with other settings, started and ready; stopped afterwards."""
        gateway = self.new_gateway(**overrides)
        gateway.start()
        try:
            gateway.wait_ready()
            yield gateway
        finally:
            gateway.stop()
            gateway.log_path.unlink(missing_ok=True)

    @property
    def services(self) -> list[ServiceProcess]:
        return [*self.visions, *self.llms, self.gateway]

    def start(self, wait_ready: bool = True) -> ProcessBackend:
        try:
            if self.redis is not None:
                self.redis.start()
            for service in self.services:
                service.start()
            for service in [*self.visions, *self.llms]:
                service.wait_serving()
            if wait_ready:
                self.gateway.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def rss(self) -> dict[str, int]:
        """RSS in bytes of each live service process."""
        return {s.name: rss_bytes(s.pid) for s in self.services if s.alive}

    def stop(self) -> None:
        for service in reversed(self.services):  # all at once: SIGTERM everyone, then wait
            if service.alive:
                service.resume()
                service.process.terminate()  # type: ignore[union-attr]
        for service in reversed(self.services):
            service.stop()
            service.log_path.unlink(missing_ok=True)
        if self.redis is not None:
            self.redis.stop()


@contextlib.contextmanager
def process_backend(model_path: str | Path, *, wait_ready: bool = True, **options: Any) -> Iterator[ProcessBackend]:
    """Started backend; wait_ready=False skips waiting for the gateway's /ready (e.g. incompatible models)."""
    backend = ProcessBackend(model_path, **options)
    backend.start(wait_ready=wait_ready)
    try:
        yield backend
    finally:
        backend.stop()
