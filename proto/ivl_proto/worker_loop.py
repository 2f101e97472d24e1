"""The child side of a sandboxed worker (see worker_pool): hard limits first, then one task at a time.

A worker module's `__main__` calls `run_worker({"kind": handler, ...})`. Before it reads any task the
process caps its own address space (RLIMIT_AS = what it maps after its imports + the memory budget) and
turns core dumps off; before each task it sets its CPU-time soft limit to the task's budget, so the
kernel ends it with SIGXCPU when the budget is spent, wherever the time goes (a C decoder loop too).
A handler returns (result header, optional payload); a ServingError becomes an error reply with its
code; MemoryError (the address-space limit reached) becomes PAYLOAD_TOO_LARGE with the task's
`memory_message` (the input needs more than a worker may use: retrying will not help), and the
worker then exits to give its heap back.
After a task whose peak left the process above `recycle_rss_bytes`, it also exits (the pool starts a
fresh one): freed heap pages of a long-lived decoder are otherwise rarely returned to the OS.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
from collections.abc import Callable, Mapping
from typing import Any

from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.worker_protocol import MAX_HEADER_BYTES, PipeEnd, payload_size, recv_header, send_message

Handler = Callable[[dict[str, Any], bytes | None], tuple[dict[str, Any], bytes | memoryview | None]]
MAX_MESSAGE_CHARS = 2000


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _set_cpu_budget(seconds: float | None) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if seconds is None:
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
        return
    soft = math.ceil(_cpu_seconds() + max(seconds, 0.01))
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _limit_memory(memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if memory_bytes > 0:
        limit = _status_kib("VmSize") * 1024 + memory_bytes
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _error_reply(code: ErrorCode, message: str) -> dict[str, Any]:
    return {"ok": False, "code": code.value, "message": message[:MAX_MESSAGE_CHARS]}


def _run_task(handlers: Mapping[str, Handler], header: dict[str, Any], payload: bytes | None) -> tuple[
    dict[str, Any], bytes | memoryview | None, bool
]:
    """(reply header, reply payload, whether the worker must exit after replying)."""
    handler = handlers.get(str(header.get("kind")))
    if handler is None:
        return _error_reply(ErrorCode.INTERNAL, f"this worker has no task kind {header.get('kind')!r}"), None, False
    _set_cpu_budget(float(header.get("cpu_s", 0)) or None)
    try:
        result, result_payload = handler(header.get("task") or {}, payload)
        return {"ok": True, "result": result}, result_payload, False
    except ServingError as error:
        return _error_reply(error.code, error.message), None, False
    except MemoryError:
        message = str(header.get("memory_message") or "the task needed more memory than the worker's limit")
        return _error_reply(ErrorCode.PAYLOAD_TOO_LARGE, message), None, True
    finally:
        _set_cpu_budget(None)


def run_worker(handlers: Mapping[str, Handler], argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a sandboxed worker (started by ivl_proto.worker_pool)")
    parser.add_argument("--in-fd", type=int, required=True)
    parser.add_argument("--out-fd", type=int, required=True)
    parser.add_argument("--memory-bytes", type=int, default=0)
    parser.add_argument("--recycle-rss-bytes", type=int, default=0)
    args = parser.parse_args(argv)
    conn_in, conn_out = PipeEnd(args.in_fd), PipeEnd(args.out_fd)
    _limit_memory(args.memory_bytes)
    send_message(conn_out, {"ready": True, "pid": os.getpid()})
    while True:
        try:
            header = recv_header(conn_in)
            size = payload_size(header)
            payload = conn_in.recv_frame(size + MAX_HEADER_BYTES) if size is not None else None
        except (EOFError, OSError):  # the pool closed the pipe (or died): nothing more to do
            return
        reply, reply_payload, must_exit = _run_task(handlers, header, payload)
        del payload
        recycle = must_exit or (args.recycle_rss_bytes > 0 and rss_bytes() > args.recycle_rss_bytes)
        reply["recycle"] = recycle
        send_message(conn_out, reply, reply_payload)
        del reply_payload
        if recycle:
            return
