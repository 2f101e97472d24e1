"""Scale-out measurements: single flight across gateway processes, and replica failover timings.

Real processes on loopback (tests/support/service_processes.py): redis-server, `python -m ivl_vision`,
`python -m ivl_llm` and several `python -m ivl_gateway`, the tiny demo checkpoint.

1. Encodes of one new image for 2 gateways x 8 concurrent requests (4 to each), with the Redis encode lock
   (`IVL_GATEWAY_ENCODE_LOCK=true`, the default) and without it (each gateway's own single flight only, as
   before), counted by the vision service itself; `--rounds` rounds each, with the requests arriving while
   the vision service is frozen (all certainly concurrent) and sent together without a freeze (as they race).
2. A lock holder SIGKILLed mid-encode: how long until the other gateway, waiting on its lock, answers.
3. A vision replica SIGKILLed under load (2 clients, a new image each request): failed requests, the slowest
   request around the kill, and how soon the restarted replica gets images again once SERVING.
4. Replicas behind one DNS name (a loopback DNS server): how soon a joining replica gets calls and a leaving
   one stops getting them, at `--dns-refresh-s`.

    .venv/bin/python bench/bench_scale_out.py                 # appends to bench/RESULTS.md
    .venv/bin/python bench/bench_scale_out.py --rounds 2 --no-append
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (
    add_paths,
    command_line,
    load_average,
    machine_line,
    markdown_table,
    publish,
    utc_now,
    versions,
)

add_paths("tests")
import redis  # noqa: E402
from support.dns_server import running_dns  # noqa: E402
from support.redis_server import free_port  # noqa: E402
from support.scale_out import (  # noqa: E402
    Load,
    chat_in_thread,
    eight_requests_for_one_new_image,
    images_seen,
    new_image,
    post_chat,
    wait_until,
)
from support.service_processes import GatewayProcess, ProcessBackend  # noqa: E402

HEADING = "## Scale-out: single flight across gateways, replica failover (bench/bench_scale_out.py)"


def write_checkpoint(folder: Path) -> Path:
    from ivl_tiny import write_tiny_checkpoint
    from ivl_tiny.spec import spec_from_preset

    return write_tiny_checkpoint(folder / "tiny", spec_from_preset("tiny"))


def single_flight(ckpt: Path, rounds: int, ttl_s: float) -> tuple[dict[tuple[bool, bool], list[int]], float]:
    backend = ProcessBackend(ckpt, gateway={"default_max_tiles": 1, "encode_lock_ttl_s": ttl_s}).start()
    counts: dict[tuple[bool, bool], list[int]] = {}
    try:
        with backend.extra_gateway() as second, backend.extra_gateway(encode_lock=False) as third, \
                backend.extra_gateway(encode_lock=False) as fourth:
            for lock, gateways in ((True, [backend.gateway, second]), (False, [third, fourth])):
                for freeze in (True, False):
                    counts[(lock, freeze)] = [eight_requests_for_one_new_image(backend, gateways, freeze=freeze)[0]
                                              for _ in range(rounds)]
            takeover = holder_killed(backend, second)
    finally:
        backend.stop()
    return counts, takeover


def holder_killed(backend: ProcessBackend, waiter: GatewayProcess) -> float:
    """A third gateway takes an image's lock (the vision service frozen), `waiter` waits on it, the holder is
    SIGKILLed: seconds from the kill to the waiter's answer."""
    assert backend.redis is not None
    locks = redis.Redis.from_url(backend.redis.url)
    holder = backend.new_gateway()
    holder.start()
    try:
        holder.wait_ready()
        assert post_chat(holder.http_url, [new_image()]).status == 200
        image = new_image(200, 150)
        backend.vision.pause()
        held: list = []
        waited: list = []
        try:
            chat_in_thread(holder.http_url, image, held, timeout_s=30)
            wait_until(lambda: any(locks.scan_iter(match="*:lock")), 30, "the holder's lock")
            before = waiter.metric("vision_cache_lock_waits_total")
            chat_in_thread(waiter.http_url, image, waited)
            wait_until(lambda: waiter.metric("vision_cache_lock_waits_total") > before, 30, "the waiter")
            holder.kill()
            killed_at = time.monotonic()
        finally:
            backend.vision.resume()
        wait_until(lambda: bool(waited), 60, "the waiter's answer")
        assert waited[0].status == 200, waited[0]
        return waited[0].ended - killed_at
    finally:
        holder.stop()
        holder.log_path.unlink(missing_ok=True)
        locks.close()


def vision_failover(ckpt: Path) -> dict[str, float]:
    backend = ProcessBackend(ckpt, vision_replicas=2, gateway={"default_max_tiles": 1, "replica_backoff_s": 0.5,
                                                               "dns_refresh_s": 1.0}).start()
    try:
        a, b = backend.visions
        with Load(backend.gateway.http_url).running() as load:
            wait_until(lambda: images_seen(a.address) >= 3 and images_seen(b.address) >= 3, 120, "both replicas")
            before_kill = list(load.outcomes)
            killed_at = time.monotonic()
            a.kill()
            load.wait_for(10)
            a.start()
            a.wait_serving()
            serving_at = time.monotonic()
            wait_until(lambda: images_seen(a.address) >= 1, 60, "traffic to the restarted replica")
            back_at = time.monotonic()
            load.wait_for(4)
        outcomes = load.outcomes
    finally:
        backend.stop()
    around = [o.ended - o.started for o in outcomes if o.started <= killed_at + 2 and o.ended >= killed_at]
    return {
        "requests": len(outcomes), "failed": sum(o.status != 200 for o in outcomes),
        "p50_before": statistics.median(o.ended - o.started for o in before_kill),
        "slowest_around_kill": max(around), "restart_to_serving": serving_at - killed_at,
        "serving_to_traffic": back_at - serving_at,
    }


def dns_follow(ckpt: Path, refresh_s: float) -> dict[str, float]:
    port = free_port()
    name = "vision.ivl.test"
    with running_dns({name: ["127.0.0.1"]}) as dns:
        backend = ProcessBackend(ckpt, vision_at=[("127.0.0.1", port), ("127.0.0.2", port)], gateway={
            "default_max_tiles": 1, "dns_refresh_s": refresh_s, "info_timeout_s": 2.0,
            "vision_addresses": f"dns://127.0.0.1:{dns.port}/{name}:{port}"}).start()
        try:
            one, two = backend.visions
            url = backend.gateway.http_url
            dns.set(name, ["127.0.0.1", "127.0.0.2"])
            changed = time.monotonic()
            wait_until(lambda: post_chat(url, [new_image()]).status == 200 and images_seen(two.address) > 0, 60,
                       "the joining replica")
            joined = time.monotonic() - changed
            dns.set(name, ["127.0.0.2"])
            changed = time.monotonic()

            def only_two() -> bool:
                before = images_seen(one.address)
                return all(post_chat(url, [new_image()]).status == 200 for _ in range(4)) and \
                    images_seen(one.address) == before

            wait_until(only_two, 60, "the leaving replica to get nothing")
            left = time.monotonic() - changed
        finally:
            backend.stop()
    return {"joined": joined, "left": left}


def report(args: argparse.Namespace, counts: dict, takeover: float, failover: dict, dns: dict, load0: float) -> str:
    def cell(values: list[int]) -> str:
        return f"{statistics.mean(values):.2f} ({', '.join(map(str, values))})"

    rows = [[("with the Redis lock (after)" if lock else "without it (before: each gateway's own single flight)"),
             cell(counts[(lock, True)]), cell(counts[(lock, False)])] for lock in (False, True)]
    lines = [
        "", HEADING, "",
        f"{utc_now()}; {machine_line(load0)} (shared with other jobs); {versions('grpc', 'redis')}",
        command_line("bench_scale_out.py", sys.argv[1:]), "",
        f"Encodes of one new image for 2 gateway processes x 8 concurrent requests (4 each), counted by the vision "
        f"service; {args.rounds} rounds each (mean, then each round):", "",
        *markdown_table(["", "requests arrive while vision is frozen", "requests sent together, no freeze"], rows),
        "",
        f"- Lock holder SIGKILLed mid-encode (lock TTL {args.lock_ttl_s} s, renewed every third): the gateway "
        f"waiting on its lock answered **{takeover:.2f} s** after the kill.",
        f"- Vision replica SIGKILLed under load (2 replicas, 2 clients, a new image per request, "
        f"`replica_backoff_s=0.5`): {failover['requests']} requests, **{failover['failed']} failed**; median "
        f"request before the kill {failover['p50_before']:.2f} s, slowest around the kill "
        f"{failover['slowest_around_kill']:.2f} s; restarted replica SERVING {failover['restart_to_serving']:.1f} s "
        f"after the kill, its first image **{failover['serving_to_traffic']:.2f} s** after that.",
        f"- Replicas behind one DNS name (`dns_refresh_s={args.dns_refresh_s}`): a joining replica got calls "
        f"{dns['joined']:.1f} s after the DNS change, a leaving one none {dns['left']:.1f} s after "
        "(grpc alone: never, for a joining one, until a connection fails).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lock-ttl-s", type=float, default=5.0)
    parser.add_argument("--dns-refresh-s", type=float, default=2.0)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    load0 = load_average()
    with tempfile.TemporaryDirectory(prefix="ivl-bench-scale-") as tmp:
        ckpt = write_checkpoint(Path(tmp))
        counts, takeover = single_flight(ckpt, args.rounds, args.lock_ttl_s)
        failover = vision_failover(ckpt)
        dns = dns_follow(ckpt, args.dns_refresh_s)
    publish(report(args, counts, takeover, failover, dns, load0), append=not args.no_append)


if __name__ == "__main__":
    main()
