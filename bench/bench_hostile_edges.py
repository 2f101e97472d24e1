"""Attacks on the gateway's public edges against real processes: what the attacker gets, the latency of a
normal user's small chat meanwhile, and the gateway's RSS (peak during, steady after).

The services are started with the Python running this script (`python -m ivl_gateway` etc. of whatever
checkout that interpreter has installed), so the same attacks can be run against an older checkout for a
before/after table:

    .venv/bin/python bench/bench_hostile_edges.py                       # this checkout; appends to RESULTS.md
    /path/to/old/.venv/bin/python bench/bench_hostile_edges.py --label before --json /tmp/before.json --no-append
    .venv/bin/python bench/bench_hostile_edges.py --before-json /tmp/before.json   # one table with both

Settings are the gateway's defaults except API keys (a normal user's key; keyless calls are attacks);
the rate-limit attack runs on a second gateway with `rate_limit=10/minute`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
from bench_concurrency import machine, write_checkpoint
from benchlib import MIB, add_paths, command_line, markdown_table, publish, utc_now

add_paths("tests")
from support.edge_attacks import (  # noqa: E402
    NormalUser,
    Outcome,
    RssSampler,
    count_closed,
    fd_count,
    open_idle,
    run_parallel,
    slow_body,
    slow_headers,
    text_plain_post,
)
from support.service_processes import ProcessBackend, rss_bytes  # noqa: E402

HEADING = "## Hostile edges: attacks on a real gateway (bench/bench_hostile_edges.py)"
KEY = "bench-normal-key"
TOKEN = "bench-internal-token"


def summarize(outcomes: list[Outcome]) -> str:
    groups: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.closed_after_s is None:
            text = f"{outcome.status or 'no answer'}, still open"
        else:
            text = f"{outcome.status or 'no answer'}, closed ~{round(outcome.closed_after_s)} s"
        groups[text] = groups.get(text, 0) + 1
    return "; ".join(f"{n}x {text}" for text, n in sorted(groups.items(), key=lambda kv: -kv[1]))


def during(user: NormalUser) -> str:
    if not user.during:
        return "-"
    latencies = [latency for latency, _ in user.during]
    bad = [status for _, status in user.during if status != 200]
    text = f"p50 {statistics.median(latencies):.2f} s, max {max(latencies):.2f} s"
    return text + (f" ({len(bad)}/{len(latencies)} failed: {sorted(set(bad))})" if bad else "")


class Bench:
    def __init__(self, backend: ProcessBackend, args: argparse.Namespace) -> None:
        self.backend = backend
        self.args = args
        self.gateway = backend.gateway
        self.rows: list[dict[str, Any]] = []
        self.steady = rss_bytes(self.gateway.pid)

    def attack(self, name: str, run: Callable[[NormalUser], str]) -> None:
        print(f"-- {name}", flush=True)
        user = NormalUser(self.gateway.http_url, KEY)
        try:
            with RssSampler(self.gateway.pid) as rss, user.asking_during():
                status = run(user)
        except Exception as error:
            status = f"bench error: {type(error).__name__}: {error}"
            rss = RssSampler(self.gateway.pid)
        time.sleep(self.args.settle_s)
        alive = all(s.alive for s in self.backend.services)
        after = rss_bytes(self.gateway.pid) if self.gateway.alive else 0
        row = {"attack": name, "status": status, "normal": during(user), "rss_peak_mib": rss.peak / MIB,
               "rss_after_mib": after / MIB, "alive": alive}
        print(json.dumps(row), flush=True)
        self.rows.append(row)

    # --- attacks -----------------------------------------------------------------------------------
    def slow_clients(self, _: NormalUser) -> str:
        port = self.gateway.http_port
        results: dict[str, list[Outcome]] = {}

        def run(name: str, target: Callable[..., Outcome], *args: object) -> None:
            results[name] = run_parallel(20, target, *args)

        threads = [
            threading.Thread(target=run, args=("slow headers", slow_headers, port, 1.0, 30.0)),
            threading.Thread(target=run, args=("slow body 100 B/s", slow_body, port, 2**19, b" " * 100, 1.0, 30.0,
                                               None, KEY)),
            threading.Thread(target=run, args=("half-sent body", slow_body, port, 2**19, b" " * 65536, 0.2, 30.0,
                                               1, KEY)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return " / ".join(f"{name}: {summarize(outcomes)}" for name, outcomes in results.items())

    def idle_connections(self, _: NormalUser) -> str:
        log_before = self.gateway.log_path.stat().st_size
        fds_before = fd_count(self.gateway.pid)
        sockets = open_idle(self.gateway.http_port, 2000)
        try:
            time.sleep(2.0)
            held = fd_count(self.gateway.pid) - fds_before
            closed_early = count_closed(sockets)
            time.sleep(self.args.idle_hold_s)
            closed_late = count_closed(sockets)  # all closed so far (the early ones included)
            grpc_ok = _grpc_health(self.gateway.grpc_address)
        finally:
            for sock in sockets:
                sock.close()
        log_bytes = self.gateway.log_path.stat().st_size - log_before
        return (f"{len(sockets)} opened; gateway held +{held} fds after 2 s; closed by the gateway: "
                f"{closed_early} at once, {closed_late} by {self.args.idle_hold_s:g} s later; gRPC health "
                f"{'ok' if grpc_ok else 'FAILED'}; {log_bytes} log bytes")

    def cross_site(self, _: NormalUser) -> str:
        """On a gateway without API keys (the default, e.g. on localhost): any web page the user visits can
        send this text/plain POST from the user's browser without a CORS preflight."""
        with self.backend.extra_gateway(api_keys=[]) as gateway:
            response = text_plain_post(gateway.http_url)
        cors = response.headers.get("access-control-allow-origin", "none")
        ran = "a chat ran" if response.status_code == 200 else "no chat"
        return f"HTTP {response.status_code} ({ran}); allow-origin: {cors}"

    def oversized_grpc(self, _: NormalUser) -> str:
        payload = _chat_bytes(b"\0" * (200 * MIB))
        results = [_raw_chat(self.gateway.grpc_address, payload, ()) for _ in range(3)]
        return "keyless 200 MiB x3: " + ", ".join(_grpc_result(r) for r in results)

    def keyless_grpc(self, _: NormalUser) -> str:
        garbage = _raw_chat(self.gateway.grpc_address, b"\xff\xff not protobuf", ())
        valid = _raw_chat(self.gateway.grpc_address, _chat_bytes(None), ())
        return f"garbage bytes: {_grpc_result(garbage)}; valid request: {_grpc_result(valid)}"

    def rate_limit(self, _: NormalUser) -> str:
        with self.backend.extra_gateway(api_keys=["attacker", KEY], rate_limit="10/minute") as gateway:
            attacker = NormalUser(gateway.http_url, "attacker")
            for _ in range(20):
                attacker.ask()
            statuses: dict[int, int] = {}
            for status in attacker.statuses:
                statuses[status] = statuses.get(status, 0) + 1
            normal = NormalUser(gateway.http_url, KEY)
            normal.ask()
            retry = httpx.post(f"{gateway.http_url}/v1/chat/completions", json={"messages": []}, timeout=30,
                               headers={"authorization": "Bearer attacker"}).headers.get("retry-after", "-")
        return (f"20 requests in a row from one key: {statuses}; Retry-After {retry}; another key meanwhile: "
                f"{normal.statuses[0]} in {normal.latencies[0]:.2f} s")

    def upload_flood(self, _: NormalUser) -> str:
        """60 clients each start a 60 MiB body and send it at 1 MiB/s for --flood-s, then hang up."""
        size = 60 * MIB
        piece = b" " * MIB
        outcomes = run_parallel(60, slow_body, self.gateway.http_port, size, piece, 1.0, self.args.flood_s,
                                None, KEY)
        return summarize(outcomes)

    def redis_burst(self, _: NormalUser) -> str:
        image = _png()
        headers = {"authorization": f"Bearer {KEY}"}
        body = _image_chat(image)
        first = httpx.post(f"{self.gateway.http_url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        log_before = self.gateway.log_path.stat().st_size
        stream_body = json.dumps({**body, "stream": True}).encode()
        asyncio.run(_hang_up(self.gateway.http_port, stream_body, 200))
        time.sleep(3.0)
        again = httpx.post(f"{self.gateway.http_url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        log = self.gateway.log_path.read_text(errors="replace")[log_before:]
        hits = again.json().get("ivl", {}).get("cache_hits") if again.status_code == 200 else None
        outage = [line for line in log.splitlines()
                  if "Redis embedding cache unavailable" in line or "Too many connections" in line]
        print("\n".join(outage[:3]), flush=True)
        return (f"200 hang-up streams; after: HTTP {again.status_code}, cache_hits={hits} (first {first.status_code}); "
                f"outage logged: {'yes' if outage else 'no'}")

    def internal_token(self, _: NormalUser) -> str:
        from ivl_proto.vision.v1 import vision_pb2, vision_pb2_grpc

        with grpc.insecure_channel(self.backend.vision.address) as channel:
            try:
                vision_pb2_grpc.VisionEncoderStub(channel).Info(vision_pb2.InfoRequest(), timeout=10)
                status = "OK (anyone can call it)"
            except grpc.RpcError as error:
                status = error.code().name
        return f"vision Info without the token: {status}; health: {'ok' if _grpc_health(self.backend.vision.address) else 'down'}"

    def large_bodies(self, _: NormalUser) -> str:
        """20 concurrent 30 MiB JSON bodies (text over max_text_chars: refused after parsing)."""
        body = b'{"messages": [{"role": "user", "content": "' + b"a" * (30 * MIB) + b'"}], "max_tokens": 2}'
        headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}

        async def burst() -> list[str]:
            async with httpx.AsyncClient(timeout=300) as client:
                async def one() -> str:
                    try:
                        return str((await client.post(f"{self.gateway.http_url}/v1/chat/completions", content=body,
                                                      headers=headers)).status_code)
                    except httpx.HTTPError as error:
                        return type(error).__name__
                return await asyncio.gather(*(one() for _ in range(20)))

        statuses = asyncio.run(burst())
        counts: dict[str, int] = {}
        for status in statuses:
            counts[status] = counts.get(status, 0) + 1
        return f"statuses {counts}"


def _grpc_health(address: str) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        except grpc.RpcError:
            return False


def _chat_bytes(image: bytes | None) -> bytes:
    from ivl_proto.common.v1 import common_pb2
    from ivl_proto.gateway.v1 import gateway_pb2

    parts = [gateway_pb2.ContentPart(text="hi")]
    if image is not None:
        parts.insert(0, gateway_pb2.ContentPart(image=gateway_pb2.Image(data=image)))
    return gateway_pb2.ChatRequest(messages=[gateway_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=parts)],
                                   sampling=common_pb2.SamplingParams(max_new_tokens=2)).SerializeToString()


def _raw_chat(address: str, payload: bytes, metadata: tuple) -> Any:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(address, options=options) as channel:
        call = channel.unary_stream("/ivl.gateway.v1.Chat/Chat", request_serializer=None, response_deserializer=None)
        try:
            return list(call(payload, metadata=metadata, timeout=120))
        except grpc.RpcError as error:
            return error


def _grpc_result(result: Any) -> str:
    if isinstance(result, grpc.RpcError):
        return f"{result.code().name} ({(result.details() or '')[:50]})"
    return f"OK ({len(result)} messages)"


def _png() -> bytes:
    from support.load_client import unique_png

    return unique_png(77_777, 64, 48)


def _image_chat(image: bytes) -> dict:
    from support.load_client import chat_body

    return chat_body("what is it?", [image], stream=False, max_tokens=2)


async def _hang_up(port: int, body: bytes, count: int) -> None:
    async def one() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                     + body)
        await writer.drain()
        writer.close()

    await asyncio.gather(*(one() for _ in range(count)))


ATTACKS = ["slow_clients", "idle_connections", "cross_site", "oversized_grpc", "keyless_grpc", "rate_limit",
           "upload_flood", "redis_burst", "internal_token", "large_bodies"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--settle-s", type=float, default=5.0, help="idle time before the steady RSS is read")
    parser.add_argument("--idle-hold-s", type=float, default=15.0)
    parser.add_argument("--flood-s", type=float, default=15.0)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--before-json", type=Path, help="rows of another checkout, shown side by side")
    parser.add_argument("--from-json", type=Path, help="report rows saved by --json instead of running again")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    before = json.loads(args.before_json.read_text()) if args.before_json else None
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        publish(report(result, before, args), append=not args.no_append)
        return
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = write_checkpoint("tiny", Path(folder))
        backend = ProcessBackend(
            checkpoint, gateway={"api_keys": [KEY], "internal_token": TOKEN, "default_max_tiles": 2},
            vision={"auth_token": TOKEN}, llm={"auth_token": TOKEN, "context_length": 8192, "max_queue": 256},
        )
        backend.start()
        try:
            bench = Bench(backend, args)
            NormalUser(backend.gateway.http_url, KEY).ask()
            baseline = NormalUser(backend.gateway.http_url, KEY)
            for _ in range(3):
                baseline.ask()
            bench.baseline = statistics.median(baseline.latencies)  # type: ignore[attr-defined]
            for name in args.attacks.split(","):
                bench.attack(name, getattr(bench, name))
            steady = rss_bytes(backend.gateway.pid) / MIB
        finally:
            backend.stop()
    result = {"label": args.label, "baseline_s": bench.baseline, "steady_mib": steady,  # type: ignore[attr-defined]
              "start_mib": bench.steady / MIB, "rows": bench.rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    section = report(result, before, args)
    publish(section, append=not args.no_append)
    if not all(row["alive"] for row in bench.rows):
        sys.exit(1)


def report(result: dict, before: dict | None, args: argparse.Namespace) -> str:
    lines = [HEADING, "", f"{utc_now()}; {machine()}", f"`{command_line('bench_hostile_edges.py', sys.argv[1:])}`", ""]
    runs = [before, result] if before else [result]
    for run in runs:
        lines.append(f"**{run['label']}**: normal request with no attack {run['baseline_s']:.2f} s; gateway RSS "
                     f"{run['start_mib']:.0f} MiB at start, {run['steady_mib']:.0f} MiB after all attacks")
    lines.append("")
    headers = ["attack", *(f"{r['label']}: attacker gets" for r in runs), *(f"{r['label']}: normal user during"
               for r in runs), *(f"{r['label']}: RSS peak / after (MiB)" for r in runs)]
    by_name = [{row["attack"]: row for row in r["rows"]} for r in runs]
    rows = []
    for name in [row["attack"] for row in result["rows"]]:
        cells = [name]
        cells += [m.get(name, {}).get("status", "-") for m in by_name]
        cells += [m.get(name, {}).get("normal", "-") for m in by_name]
        cells += [f"{m[name]['rss_peak_mib']:.0f} / {m[name]['rss_after_mib']:.0f}" if name in m else "-"
                  for m in by_name]
        rows.append(cells)
    lines += markdown_table(headers, rows)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
