"""A real 3-primary Redis Cluster on loopback, for tests (sync; usable from async tests too).

    from support.redis_cluster import running_redis_cluster
    with running_redis_cluster() as cluster:      # cluster.url == "redis://127.0.0.1:P1/0" (any node will do)
        cluster.ports                              # the three primaries
        cluster.node_of(key)                       # the port of the primary that holds the key's slot
        cluster.kill(port); cluster.restart(port)  # one primary down and back (its slots with it)

Each node is `redis-server --cluster-enabled yes` (LRU, no persistence, like the single test server); the
cluster is made by `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`, then waited for until
every node reports `cluster_state:ok`. A node's cluster bus is its port + 10000, so ports are picked where
both are free. Skips the calling test when redis-server or redis-cli is not installed.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 < 65536 and _bindable(port + 10000):
            return port
        candidate = 20000 + port % 30000  # ephemeral ports are high: try one in the range below
        if _bindable(candidate) and _bindable(candidate + 10000):
            return candidate
    raise RuntimeError("no free port pair (port, port + 10000) found on 127.0.0.1")


def _tools() -> tuple[str, str]:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        import pytest

        pytest.skip("redis-server / redis-cli are not installed (apt-get install redis-server)")
    return server, cli


class RedisCluster:
    def __init__(self, nodes: int = 3, maxmemory: str = "64mb") -> None:
        self.ports = [cluster_port() for _ in range(nodes)]
        self.maxmemory = maxmemory
        self._dir = Path(tempfile.mkdtemp(prefix="ivl-redis-cluster-"))
        self._processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def _start_node(self, port: int) -> None:
        server, _ = _tools()
        node_dir = self._dir / str(port)
        node_dir.mkdir(exist_ok=True)
        self._processes[port] = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(node_dir / "nodes.conf"), "--cluster-node-timeout", "2000",
             "--save", "", "--appendonly", "no", "--dir", str(node_dir), "--protected-mode", "no",
             "--maxmemory", self.maxmemory, "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def cli(self, port: int, *args: str, timeout_s: float = 30) -> str:
        _, cli = _tools()
        result = subprocess.run([cli, "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True, text=True,
                                timeout=timeout_s, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)}: {result.stderr or result.stdout}")
        return result.stdout

    def _wait(self, condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                if condition():
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the Redis Cluster on {self.ports} did not get {what} within {timeout_s} s")

    def start(self) -> RedisCluster:
        for port in self.ports:
            self._start_node(port)
        for port in self.ports:
            self._wait(lambda p=port: "PONG" in self.cli(p, "ping", timeout_s=2), f"node {port} up")
        _, cli = _tools()
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       capture_output=True, text=True, timeout=60, check=True)
        self.wait_ok()
        return self

    def wait_ok(self, timeout_s: float = 30) -> None:
        """Every node says cluster_state:ok (all 16384 slots served)."""
        self._wait(lambda: all("cluster_state:ok" in self.cli(p, "cluster", "info", timeout_s=2) for p in self.ports),
                   "cluster_state:ok", timeout_s)

    def node_of(self, key: str) -> int:
        """The port of the primary serving the key's slot."""
        slot = int(self.cli(self.ports[0], "cluster", "keyslot", key).strip())
        for line in self.cli(self.ports[0], "cluster", "nodes").splitlines():
            fields = line.split()  # id ip:port@bus flags master ping pong epoch state slot-ranges...
            for span in fields[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(fields[1].split("@")[0].rsplit(":", 1)[1])
        raise RuntimeError(f"no primary serves slot {slot}")

    def kill(self, port: int) -> None:
        process = self._processes.pop(port)
        process.kill()
        process.wait(timeout=5)

    def restart(self, port: int) -> None:
        """The node again on its port, with its cluster config (so it rejoins with its slots, empty)."""
        self._start_node(port)
        self.wait_ok()

    def stop(self) -> None:
        for process in self._processes.values():
            process.terminate()
        for process in self._processes.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self._processes.clear()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextlib.contextmanager
def running_redis_cluster(nodes: int = 3, maxmemory: str = "64mb") -> Iterator[RedisCluster]:
    cluster = RedisCluster(nodes, maxmemory)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
