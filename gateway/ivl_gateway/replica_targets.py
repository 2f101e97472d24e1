"""Replica addresses as users write them, resolved to socket addresses, and the grpc target they become.

Entries (`IVL_GATEWAY_VISION_ADDRESSES` / `..._LLM_ADDRESSES`, comma-separated):
  `host:port`, `[v6]:port`      one replica (an IP literal), or every address a host name resolves to
  `dns:///NAME:PORT`            grpc's own DNS target: every address NAME resolves to (a headless Service)
  `dns:NAME:PORT`               the same (the older spelling)
  `dns://SERVER/NAME:PORT`      NAME resolved by the DNS server SERVER (`ip` or `ip:port`), not the system's

One entry that names a host becomes grpc's `dns://[SERVER]/NAME:PORT` target (grpc's resolver, round robin
over every address). IP literals and lists of several entries become a static `ipv4:`/`ipv6:` target of the
addresses the gateway resolved itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass

log = logging.getLogger(__name__)

FORMS = "host:port, [v6]:port, dns:///NAME:PORT, dns:NAME:PORT or dns://DNS_SERVER/NAME:PORT"


@dataclass(frozen=True)
class Target:
    host: str  # a name or an IP literal (without brackets)
    port: int
    dns_server: str = ""  # "ip" or "ip:port" of a dns://SERVER/NAME:PORT entry

    @property
    def is_literal(self) -> bool:
        return _ip(self.host) is not None

    def socket_address(self) -> str:
        """`ip:port` / `[v6]:port` of an IP-literal target."""
        return _join(self.host, self.port)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_host_port(text: str, entry: str) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        port_text = rest[1:] if bracket and rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536 or "/" in host:
        raise ValueError(f"replica address {entry!r} is not one of: {FORMS}")
    return host, int(port_text)


def parse_target(entry: str) -> Target:
    """One address entry as written in the settings; ValueError (naming the accepted forms) otherwise."""
    text = entry.strip()
    if text.startswith("dns:"):
        rest = text[4:]
        server = ""
        if rest.startswith("//"):
            server, slash, rest = rest[2:].partition("/")
            if not slash:
                raise ValueError(f"replica address {entry!r} is not one of: {FORMS}")
        host, port = _split_host_port(rest, entry)
        return Target(host, port, server)
    if "://" in text or text.split(":", 1)[0] in ("ipv4", "ipv6", "unix", "xds"):
        raise ValueError(f"replica address {entry!r} is not one of: {FORMS}")
    host, port = _split_host_port(text, entry)
    return Target(host, port)


def channel_target(targets: list[Target], addresses: list[str]) -> str:
    """The grpc target of one service: grpc's DNS resolver for a single name, else the resolved addresses."""
    if len(targets) == 1 and not targets[0].is_literal:
        only = targets[0]
        return f"dns://{only.dns_server}/{_join(only.host, only.port)}"
    if not addresses:  # names that resolve to nothing: let grpc say so ("DNS resolution failed for ...")
        first = next((t for t in targets if not t.is_literal), targets[0])
        return f"dns://{first.dns_server}/{_join(first.host, first.port)}"
    v4 = [a for a in addresses if not a.startswith("[")]
    if v4:  # grpc's static targets take one address family; IPv4 wins when a name has both
        return "ipv4:" + ",".join(v4)
    return "ipv6:" + ",".join(a for a in addresses)


async def resolve(target: Target, timeout_s: float = 5.0) -> list[str]:
    """Socket addresses (`ip:port`) of one target, sorted; [] when the name does not resolve."""
    if target.is_literal:
        return [target.socket_address()]
    try:
        if target.dns_server:
            hosts = await asyncio.wait_for(_query_server(target), timeout_s)
        else:
            loop = asyncio.get_running_loop()
            infos = await asyncio.wait_for(
                loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM), timeout_s)
            hosts = [str(info[4][0]) for info in infos]
    except (OSError, TimeoutError, ValueError) as error:
        log.debug("could not resolve %s: %s", target.host, error)
        return []
    return sorted({_join(host, target.port) for host in hosts})


async def _query_server(target: Target) -> list[str]:
    """A and AAAA records of the target's name from its own DNS server (dnspython)."""
    import dns.asyncresolver
    import dns.exception

    server, port = target.dns_server, 53
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        server, port = host, int(rest[1:]) if rest.startswith(":") else 53
    elif server.count(":") == 1:
        server, port_text = server.split(":")
        port = int(port_text)
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [server]
    resolver.port = port
    hosts: list[str] = []
    for kind in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(target.host, kind, search=False)
        except dns.exception.DNSException:
            continue
        hosts.extend(record.to_text() for record in answer)
    return hosts


async def resolve_all(targets: list[Target]) -> list[str]:
    found = await asyncio.gather(*(resolve(t) for t in targets))
    return sorted({address for addresses in found for address in addresses})
