"""HTTP connection admission on top of uvicorn's h11 protocol: what uvicorn 0.54 does not do itself.

Measured (docs/gateway.md "Why uvicorn"): uvicorn never closes a connection that sends nothing or only part
of its headers, never times out a slow body, and its `limit_concurrency` answers 503 to every new request
once idle sockets fill it. This subclass of `uvicorn.protocols.http.h11_impl.H11Protocol` adds, per
connection:

- a header deadline (`http_header_timeout_s`) from the connection's start, or from the end of its previous
  response, to a complete request head: an idle socket is closed silently, a partial head gets 408;
- a body deadline: no body bytes for `http_body_idle_timeout_s`, a rate under `http_min_body_rate_bytes_s`
  after `http_body_rate_grace_s`, or the whole body over `http_body_timeout_s` -> 408 and close;
- a cap of `http_max_connections` open connections: at the cap an idle connection (no request in progress)
  is closed to make room — first the oldest of those that have sent nothing, not even bytes still waiting
  in the kernel's receive buffer (a real client's request can sit there, unread, while the event loop accepts
  a burst of a flood's sockets: FIONREAD tells them apart), then those with part of a request, then
  kept-alive ones of clients that were served, oldest first — and when none is idle the new one gets 503 +
  Retry-After;
- a keep-alive reuse limit (`http_max_requests_per_connection`: the last response says `Connection: close`).

Everything else (parsing, header size via h11_max_incomplete_event_size, idle keep-alive via
timeout_keep_alive, flow control, ASGI) is uvicorn's own.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import struct
import termios
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from prometheus_client import Counter, Gauge
from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.h11_impl import H11Protocol

from ivl_gateway.log_throttle import LogThrottle
from ivl_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

BODY_CHECK_S = 1.0
# The scope key where the guard records the status it answered itself (the access log reads it).
EDGE_STATUS_KEY = "ivl.edge_status"
_PHRASES = {408: "Request Timeout", 503: "Service Unavailable"}


@dataclass(frozen=True)
class GuardLimits:
    header_timeout_s: float
    body_timeout_s: float
    body_idle_timeout_s: float
    min_body_rate: int
    body_rate_grace_s: float
    max_connections: int
    max_requests_per_connection: int

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> GuardLimits:
        return cls(
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            body_idle_timeout_s=settings.http_body_idle_timeout_s,
            min_body_rate=settings.http_min_body_rate_bytes_s,
            body_rate_grace_s=settings.http_body_rate_grace_s,
            max_connections=settings.http_max_connections,
            max_requests_per_connection=settings.http_max_requests_per_connection,
        )


def raw_error_response(status: int, code: str, message: str, retry_after_s: int | None = None) -> bytes:
    """A complete HTTP/1.1 response with an OpenAI-shaped error body that closes the connection."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                 else "service_unavailable", "code": code, "param": None}}).encode()
    head = (f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n")
    if retry_after_s is not None:
        head += f"retry-after: {retry_after_s}\r\n"
    return (head + "\r\n").encode() + body


class ConnectionGuard:
    """The open connections of one HTTP server: idle ones in the order they became idle (those that never sent
    a request apart from kept-alive ones), busy ones apart."""

    def __init__(self, limits: GuardLimits, connections: Gauge, closed: Counter, throttle: LogThrottle) -> None:
        self.limits = limits
        self._fresh: OrderedDict[GuardedH11Protocol, None] = OrderedDict()  # idle, no request yet
        self._kept: OrderedDict[GuardedH11Protocol, None] = OrderedDict()  # idle between requests
        self._busy: set[GuardedH11Protocol] = set()
        self._gauge = connections
        self._closed = closed
        self._throttle = throttle

    @property
    def open_connections(self) -> int:
        return len(self._fresh) + len(self._kept) + len(self._busy)

    def connections(self) -> list[GuardedH11Protocol]:
        """Every open connection: idle ones, then busy ones."""
        return [*self._fresh, *self._kept, *self._busy]

    def protocol_class(self) -> type[H11Protocol]:
        """The class to give uvicorn as `http=`: GuardedH11Protocol bound to this guard."""
        return type("BoundGuardedH11Protocol", (GuardedH11Protocol,), {"guard": self})

    def admit(self, conn: GuardedH11Protocol) -> bool:
        if self.open_connections >= self.limits.max_connections:
            if not self._fresh and not self._kept:
                self.closed("refused_at_cap", "HTTP connection cap (%d) reached and every connection has a "
                            "request in progress: refusing new connections with 503", self.limits.max_connections,
                            level=logging.WARNING)
                return False
            victim = self._victim()
            self.closed("evicted_idle", "HTTP connection cap (%d) reached: closing the connections idle the "
                        "longest to make room", self.limits.max_connections, level=logging.WARNING)
            victim.close_idle()
        self._fresh[conn] = None
        self._report()
        return True

    def _victim(self) -> GuardedH11Protocol:
        """The idle connection to close at the cap (see the module docstring), taken out of its set."""
        for conn in self._fresh:  # oldest first
            if conn.silent and conn.unread_bytes() == 0:
                del self._fresh[conn]
                return conn
        victim, _ = (self._fresh or self._kept).popitem(last=False)
        return victim

    def mark_idle(self, conn: GuardedH11Protocol, served: bool) -> None:
        self._busy.discard(conn)
        self._fresh.pop(conn, None)
        self._kept.pop(conn, None)
        (self._kept if served else self._fresh)[conn] = None
        self._report()

    def mark_busy(self, conn: GuardedH11Protocol) -> None:
        self._fresh.pop(conn, None)
        self._kept.pop(conn, None)
        self._busy.add(conn)
        self._report()

    def forget(self, conn: GuardedH11Protocol) -> None:
        self._fresh.pop(conn, None)
        self._kept.pop(conn, None)
        self._busy.discard(conn)
        self._report()

    def closed(self, reason: str, message: str, *args: object, level: int = logging.INFO) -> None:
        """Count a connection the guard closed (metric by reason) and log it, once per interval per reason."""
        self._closed.labels(reason=reason).inc()
        self._throttle.log(log, level, f"http-guard:{reason}", message, *args)

    def _report(self) -> None:
        self._gauge.set(self.open_connections)


class GuardedH11Protocol(H11Protocol):
    guard: ClassVar[ConnectionGuard]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self._timer: asyncio.TimerHandle | None = None
        self._phase = ""
        self._phase_bytes = 0
        self._requests = 0
        self._cycle_seen: Any = None
        self._body_start = self._body_last = 0.0
        self._body_bytes = 0
        super().connection_made(transport)  # type: ignore[arg-type]
        if not self.guard.admit(self):
            self.transport.write(raw_error_response(
                503, "overloaded", "the gateway has as many HTTP connections as it may "
                f"({self.guard.limits.max_connections}); retry in a moment", retry_after_s=1))
            self.transport.close()
            return
        self._enter("idle")

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":
            self._phase_bytes += len(data)
        elif self._phase == "body":
            self._body_bytes += len(data)
            self._body_last = self.loop.time()
        super().data_received(data)
        self._update()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._phase = "closed"
        self.guard.forget(self)
        super().connection_lost(exc)

    # -- phases ----------------------------------------------------------------------------------------
    def _update(self) -> None:
        if self.transport.is_closing() or self._phase == "closed":
            return
        cycle = self.cycle
        if cycle is not None and cycle is not self._cycle_seen:  # a new request head arrived
            self._cycle_seen = cycle
            self._requests += 1
            if self._requests >= self.guard.limits.max_requests_per_connection:
                self.headers.append(CLOSE_HEADER)  # uvicorn answers "Connection: close" and closes after it
        theirs = self.conn.their_state
        if theirs is h11.SEND_BODY:
            phase = "body"
        elif theirs is h11.IDLE and (cycle is None or cycle.response_complete):
            phase = "idle"
        else:
            phase = "busy"
        if phase != self._phase:
            self._enter(phase)

    def _enter(self, phase: str) -> None:
        self._cancel_timer()
        self._phase = phase
        limits = self.guard.limits
        if phase == "idle":
            self._phase_bytes = 0
            self.guard.mark_idle(self, served=self._requests > 0)
            self._timer = self.loop.call_later(limits.header_timeout_s, self._header_deadline)
        elif phase == "body":
            self.guard.mark_busy(self)
            self._body_start = self._body_last = self.loop.time()
            self._body_bytes = 0
            self._timer = self.loop.call_later(BODY_CHECK_S, self._check_body)
        else:
            self.guard.mark_busy(self)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_deadline(self) -> None:
        self._timer = None
        if self._phase != "idle" or self.transport.is_closing():
            return
        timeout = self.guard.limits.header_timeout_s
        if self._phase_bytes:
            self.guard.closed("header_timeout", "closed HTTP connections that did not send their request "
                              "headers within %g s (http_header_timeout_s)", timeout)
            self.transport.write(raw_error_response(
                408, "request_timeout", f"the request headers did not arrive within {timeout:g} s "
                "(http_header_timeout_s)"))
        else:
            self.guard.closed("idle_timeout", "closed HTTP connections that sent nothing for %g s", timeout)
        self._close()

    @property
    def silent(self) -> bool:
        """Idle and nothing received on this connection yet."""
        return self._phase == "idle" and self._requests == 0 and self._phase_bytes == 0

    def unread_bytes(self) -> int:
        """Bytes the kernel has received on this connection that the event loop has not read yet."""
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return 0
        try:
            return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0])
        except OSError:
            return 0

    def close_idle(self) -> None:
        """Closed by the guard to make room (this connection has no request in progress)."""
        self._cancel_timer()
        self._close()

    def _check_body(self) -> None:
        self._timer = None
        if self._phase != "body" or self.transport.is_closing():
            return
        limits = self.guard.limits
        now = self.loop.time()
        if self.flow.read_paused:  # the application is not reading yet: the client is not at fault
            self._body_last = now
            self._body_start += BODY_CHECK_S
        elapsed = now - self._body_start
        reason = ""
        if now - self._body_last > limits.body_idle_timeout_s:
            reason = (f"no request body bytes arrived for {limits.body_idle_timeout_s:g} s "
                      "(http_body_idle_timeout_s)")
        elif elapsed > limits.body_timeout_s:
            reason = f"the request body took longer than {limits.body_timeout_s:g} s (http_body_timeout_s)"
        elif limits.min_body_rate and elapsed > limits.body_rate_grace_s and (
            self._body_bytes / elapsed < limits.min_body_rate
        ):
            reason = (f"the request body arrived at {self._body_bytes / elapsed:.0f} bytes/s; the minimum is "
                      f"{limits.min_body_rate} bytes/s (http_min_body_rate_bytes_s)")
        if not reason:
            self._timer = self.loop.call_later(BODY_CHECK_S, self._check_body)
            return
        self.guard.closed("body_timeout", "closed HTTP connections whose request body was too slow (%s)", reason)
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self.scope[EDGE_STATUS_KEY] = 408  # type: ignore[literal-required]
            self.transport.write(raw_error_response(408, "request_timeout", reason))
        self._close()

    def _close(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the application's receive() answers http.disconnect at once
            cycle.message_event.set()
        self._phase = "closed"
        self.guard.forget(self)
        self.transport.close()
