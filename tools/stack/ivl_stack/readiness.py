"""Probes the launcher polls until a child is ready: Redis PING, grpc.health.v1 SERVING, HTTP 200."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

Probe = Callable[[], bool]


class NotReady(RuntimeError):
    """A child did not become ready; the message says which and why."""


def redis_probe(host: str, port: int) -> Probe:
    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1.0) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    return probe


def grpc_health_probe(address: str, service: str = "") -> Probe:
    def probe() -> bool:
        with grpc.insecure_channel(address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=2.0
                )
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    return probe


def http_probe(url: str) -> Probe:
    def probe() -> bool:
        try:
            return httpx.get(url, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    return probe


def wait_ready(
    name: str, probe: Probe, exited: Callable[[], int | None], timeout_s: float, interval_s: float = 0.25
) -> float:
    """Poll until probe() is true; return the seconds waited. Raise NotReady if the child exits or
    timeout_s passes."""
    started = time.monotonic()
    while True:
        if probe():
            return time.monotonic() - started
        code = exited()
        if code is not None:
            raise NotReady(f"{name} exited with code {code} before it was ready (its log is above)")
        if time.monotonic() - started > timeout_s:
            raise NotReady(f"{name} was not ready after {timeout_s:.0f} s (raise IVL_STACK_READY_TIMEOUT_S?)")
        time.sleep(interval_s)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0
