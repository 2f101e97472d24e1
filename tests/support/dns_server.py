"""A tiny authoritative DNS server on a free loopback UDP port, for tests of replicas behind one name.

    with running_dns({"vision.ivl.test": ["127.0.0.1"]}) as dns:
        target = f"dns://127.0.0.1:{dns.port}/vision.ivl.test:{port}"   # grpc's and the gateway's resolver
        dns.set("vision.ivl.test", ["127.0.0.1", "127.0.0.2"])          # a replica joins
        dns.queries                                                     # questions answered so far

Answers A records (TTL 1 s) for the names it holds, an empty answer for other types (AAAA, TXT, SRV) and
NXDOMAIN for unknown names. Messages are parsed and built with dnspython. Linux routes all of 127/8 to
the loopback device, so replicas can listen on 127.0.0.2, 127.0.0.3, ... like pods with their own IPs.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, records: dict[str, list[str]] | None = None) -> None:
        self._records = {name.rstrip("."): list(ips) for name, ips in (records or {}).items()}
        self._lock = threading.Lock()
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    def set(self, name: str, ips: list[str]) -> None:
        with self._lock:
            self._records[name.rstrip(".")] = list(ips)

    def start(self) -> DnsServer:
        self._thread.start()
        return self

    def _answer(self, data: bytes) -> bytes:
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        for question in query.question:
            name = question.name.to_text().rstrip(".")
            with self._lock:
                self.queries += 1
                ips = self._records.get(name)
            if ips is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.A and ips:
                response.answer.append(dns.rrset.from_text(question.name, 1, "IN", "A", *ips))
        return response.to_wire()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(Exception):  # a malformed packet gets no answer
                self._sock.sendto(self._answer(data), peer)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@contextlib.contextmanager
def running_dns(records: dict[str, list[str]] | None = None) -> Iterator[DnsServer]:
    server = DnsServer(records).start()
    try:
        yield server
    finally:
        server.stop()
