"""A pool of sandboxed worker processes for work on untrusted input (image decoding, previews).

Each worker is `python -m <module>` (a module whose main calls ivl_proto.worker_loop.run_worker), with
its own address-space limit, a CPU-time budget per task enforced by the kernel (RLIMIT_CPU ->
SIGXCPU), and a wall-clock guard enforced here (SIGKILL). A task whose caller is cancelled (a gRPC
client that hung up) kills its worker at once, so its CPU stops being spent; a fresh worker takes the
slot. Nothing but JSON headers and raw payload bytes crosses the pipes (see worker_protocol).

    pool = WorkerPool(WorkerPoolConfig(module="ivl_vision.decode_worker", size=2, ...), name="decode")
    await pool.start()
    header, buffer = await pool.run("tile", task, payload, cpu_s=3, wall_s=10, receive=allocate)
    await pool.close()

Workers start with `subprocess` (not multiprocessing), so they import only their module: no torch,
no gRPC server state, no fork of a threaded parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import heapq
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ivl_proto.errors import ErrorCode, ServingError
from ivl_proto.wait_line import WaitLine
from ivl_proto.worker_protocol import PipeEnd, ProtocolError, payload_size, recv_header, send_message

log = logging.getLogger(__name__)

# Environment of every worker: one thread per library, few malloc arenas (the address-space limit
# counts reserved arena space), and no inherited tuning of the parent's thread pools.
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
    # Keep freed buffers in the heap for the next task (no page faults re-mapping 20 MB per image); the
    # pool's RSS check replaces a worker whose heap grew past recycle_rss_bytes, which gives it all back.
    "MALLOC_MMAP_THRESHOLD_": str(64 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
    "PYTHONUNBUFFERED": "1",
}
START_TIMEOUT_S = 60.0

# receive(result) -> a writable buffer exactly as long as the announced payload, or None to
# take the payload as bytes. It runs in the pool's I/O thread and may raise to refuse the result.
Receive = Callable[[dict[str, Any]], memoryview | None]


@dataclass(frozen=True)
class WorkerPoolConfig:
    module: str  # python -m <module>
    size: int = 2
    memory_bytes: int = 1 << 30  # address space a worker may map beyond what its imports mapped; 0 = no limit
    recycle_rss_bytes: int = 512 << 20  # a worker above this RSS after a task is replaced; 0 = never
    recycle_after_tasks: int = 0  # replace a worker after this many tasks; 0 = never
    max_payload_bytes: int = 64 << 20  # a reply payload without a caller's buffer may be at most this long
    aging_s: float = 5.0  # a task waiting longer than this for a worker goes before cheaper ones
    reserved_for_light: int = 0  # free workers that only take tasks costing at most light_cost
    light_cost: float = 0.0
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class PoolStats:
    tasks: int = 0
    cpu_kills: int = 0  # ended by the kernel at the CPU budget (SIGXCPU)
    wall_kills: int = 0  # killed here at the wall-clock guard
    cancel_kills: int = 0  # killed because the caller went away
    crashes: int = 0  # died otherwise (a signal, an exit)
    recycles: int = 0  # replaced after a memory-heavy task or the task count
    starts: int = 0


class WorkerStopped(Exception):
    """The worker of a task ended before replying; `reason` is cpu, wall, cancelled or crashed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _Worker:
    """One worker process and the two pipes to it."""

    def __init__(self, process: subprocess.Popen[bytes], to_worker: PipeEnd, from_worker: PipeEnd) -> None:
        self.process = process
        self.to_worker = to_worker
        self.from_worker = from_worker
        self.tasks = 0
        self.killed_for: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self, reason: str) -> None:
        if self.killed_for is None:
            self.killed_for = reason
        with contextlib.suppress(ProcessLookupError, OSError):
            self.process.kill()

    def close(self) -> None:
        for conn in (self.to_worker, self.from_worker):
            with contextlib.suppress(OSError):
                conn.close()

    def reap(self, timeout: float = 5.0) -> int | None:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(self.killed_for or "crashed")
            return self.process.wait(timeout=timeout)


def _widen_pipe(fd: int) -> None:
    """Raise a pipe's buffer from 64 KiB to the system's maximum (1 MiB by default): 20 MB of pixels then
    cross in ~20 writes instead of ~330, each a context switch between worker and pool."""
    with contextlib.suppress(OSError, AttributeError):
        with open("/proc/sys/fs/pipe-max-size") as limit:
            size = int(limit.read())
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(size, 16 << 20))


class _Deadline:
    """One armed deadline of the watchdog: `finish()` disarms it; False if it already fired."""

    def __init__(self, watchdog: _Watchdog, at: float, worker: _Worker) -> None:
        self._watchdog = watchdog
        self.at = at
        self.worker = worker
        self.done = False
        self.fired = False

    def finish(self) -> bool:
        return self._watchdog.finish(self)


class _Watchdog:
    """Kills a worker (reason "wall") whose exchange is not finished by its deadline. One thread for the whole
    pool, started once (a threading.Timer per task started a thread per image: most of a small image's cost)."""

    def __init__(self, name: str) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._count = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"ivl-{name}-watchdog", daemon=True)
        self._thread.start()

    def arm(self, seconds: float, worker: _Worker) -> _Deadline:
        deadline = _Deadline(self, time.monotonic() + seconds, worker)
        with self._cond:
            self._count += 1
            heapq.heappush(self._heap, (deadline.at, self._count, deadline))
            if self._heap[0][2] is deadline:
                self._cond.notify()
        return deadline

    def finish(self, deadline: _Deadline) -> bool:
        with self._cond:
            deadline.done = True
            return not deadline.fired

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                at, _, deadline = self._heap[0]
                remaining = at - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                heapq.heappop(self._heap)
                deadline.fired = deadline.done = True
                deadline.worker.kill("wall")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class WorkerPool:
    """`size` sandboxed workers; `run` gives a task to the next free one (FIFO)."""

    def __init__(self, config: WorkerPoolConfig, name: str = "worker") -> None:
        if config.size < 1 or not 0 <= config.reserved_for_light < config.size:
            raise ValueError(
                f"a worker pool needs at least one worker and fewer reserved ones, got size={config.size}, "
                f"reserved_for_light={config.reserved_for_light}"
            )
        self.config = config
        self.name = name
        self.stats = PoolStats()
        self._idle: list[_Worker] = []
        self._line = WaitLine(config.aging_s)  # tasks waiting for a worker: cheapest first, with aging
        self._started = False
        self._io = ThreadPoolExecutor(max_workers=config.size, thread_name_prefix=f"ivl-{name}-io")
        self._workers: set[_Worker] = set()
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False
        self._watchdog = _Watchdog(name)

    @property
    def pids(self) -> list[int]:
        return sorted(w.pid for w in self._workers)

    @property
    def busy(self) -> int:
        return len(self._workers) - len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._line)

    async def start(self) -> None:
        """Start every worker and wait until each has set its limits and said it is ready."""
        workers = await asyncio.gather(*(self._spawn() for _ in range(self.config.size)))
        self._started = True
        for worker in workers:
            self._release(worker)

    def _spawn_sync(self) -> _Worker:
        parent_in, child_out = os.pipe()
        child_in, parent_out = os.pipe()
        for fd in (parent_in, parent_out):
            _widen_pipe(fd)
        argv = [
            sys.executable, "-m", self.config.module, "--in-fd", str(child_in), "--out-fd", str(child_out),
            "--memory-bytes", str(self.config.memory_bytes), "--recycle-rss-bytes", str(self.config.recycle_rss_bytes),
        ]
        env = {**os.environ, **WORKER_ENV, **self.config.env}
        try:
            process = subprocess.Popen(
                argv, pass_fds=(child_in, child_out), env=env, stdin=subprocess.DEVNULL, close_fds=True
            )
        finally:
            os.close(child_in)
            os.close(child_out)
        worker = _Worker(process, PipeEnd(parent_out), PipeEnd(parent_in))
        try:
            if not worker.from_worker.poll(START_TIMEOUT_S):
                raise RuntimeError(f"the {self.name} worker did not start within {START_TIMEOUT_S:.0f} s")
            hello = recv_header(worker.from_worker)
            if not hello.get("ready"):
                raise RuntimeError(f"the {self.name} worker sent {hello!r} instead of ready")
        except (EOFError, OSError, ProtocolError, RuntimeError) as error:
            worker.kill("crashed")
            code = worker.reap()
            worker.close()
            raise RuntimeError(
                f"could not start a {self.name} worker (python -m {self.config.module}): {error} ({_describe_exit(code)})"
            ) from None
        self.stats.starts += 1
        return worker

    async def _spawn(self) -> _Worker:
        worker = await asyncio.get_running_loop().run_in_executor(None, self._spawn_sync)
        if self._closed:
            self._retire(worker)
            raise ServingError(ErrorCode.UNAVAILABLE, f"the {self.name} pool is shut down")
        self._workers.add(worker)
        return worker

    def _replace_later(self) -> None:
        """Start a worker for a slot whose worker ended; it joins the idle queue when ready."""
        if self._closed:
            return

        async def replace() -> None:
            delay = 0.1
            while not self._closed:
                try:
                    worker = await self._spawn()
                except ServingError:
                    return
                except RuntimeError as error:
                    log.error("%s; retrying in %.1f s", error, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                self._release(worker)
                return

        task = asyncio.get_running_loop().create_task(replace(), name=f"ivl-{self.name}-respawn")
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    def _retire(self, worker: _Worker) -> None:
        self._workers.discard(worker)
        worker.kill(worker.killed_for or "retired")
        worker.close()

    def _exchange(
        self, worker: _Worker, message: dict[str, Any], payload: bytes | memoryview | None, wall_s: float,
        receive: Receive | None,
    ) -> tuple[dict[str, Any], memoryview | bytes | None]:
        """Blocking: send one task, wait for its reply, read the reply's payload; a watchdog kills the worker
        when the whole exchange takes longer than wall_s (a stalled worker blocks the send, too)."""
        watchdog = self._watchdog.arm(wall_s, worker)
        try:
            send_message(worker.to_worker, message, payload)
            reply = recv_header(worker.from_worker)
            size = payload_size(reply)
            data: memoryview | bytes | None = None
            if size is not None:
                target = None
                if receive is not None and reply.get("ok"):
                    try:
                        target = receive(reply.get("result") or {})
                    except BaseException:
                        worker.kill("crashed")  # its payload is still in the pipe: the worker cannot be reused
                        raise
                if target is None:
                    data = worker.from_worker.recv_frame(self.config.max_payload_bytes)
                else:
                    if target.nbytes != size:
                        worker.kill("crashed")
                        raise WorkerStopped("crashed", f"the worker sent {size} bytes where {target.nbytes} were due")
                    worker.from_worker.recv_frame_into(target)
                    data = target
            if not watchdog.finish():
                raise EOFError("the watchdog fired")
            return reply, data
        except (EOFError, OSError, ProtocolError) as error:
            watchdog.finish()
            if isinstance(error, ProtocolError):
                worker.kill("crashed")
            code = worker.reap()
            reason = worker.killed_for or ("cpu" if code == -signal.SIGXCPU else "crashed")
            if reason == "wall":
                raise WorkerStopped(reason, f"no reply within {wall_s:g} s") from None
            raise WorkerStopped(reason, f"the worker ended ({_describe_exit(code)})") from None
        except BaseException:
            watchdog.finish()
            raise

    async def run(
        self,
        kind: str,
        task: dict[str, Any],
        payload: bytes | memoryview | None = None,
        *,
        cpu_s: float,
        wall_s: float,
        receive: Receive | None = None,
        memory_message: str = "",
        cost: float = 0.0,
    ) -> tuple[dict[str, Any], memoryview | bytes | None]:
        """Run one task (waiting tasks get workers cheapest `cost` first, with aging); returns (the handler's result header, its payload). A handler's error comes back as
        ServingError with its code; a worker that ended raises WorkerStopped (reason cpu/wall/crashed)."""
        if self._closed or not self._started:
            raise ServingError(ErrorCode.UNAVAILABLE, f"the {self.name} pool is not running")
        worker = await self._acquire(cost)
        message = {"kind": kind, "task": task, "cpu_s": cpu_s, "memory_message": memory_message}
        loop = asyncio.get_running_loop()
        exchange = loop.run_in_executor(self._io, self._exchange, worker, message, payload, wall_s, receive)
        self.stats.tasks += 1
        worker.tasks += 1
        started = time.monotonic()
        try:
            reply, data = await asyncio.shield(exchange)
        except asyncio.CancelledError:
            worker.kill("cancelled")
            self.stats.cancel_kills += 1
            with contextlib.suppress(Exception):
                await exchange  # the I/O thread sees the pipe close and returns
            self._retire(worker)
            self._replace_later()
            raise
        except WorkerStopped as stopped:
            self._count_stop(stopped.reason)
            log.warning("%s worker %d stopped during a %s task after %.1f s: %s (%s)", self.name, worker.pid,
                        kind, time.monotonic() - started, stopped.reason, stopped.detail)
            self._retire(worker)
            self._replace_later()
            raise
        except BaseException:
            self._retire(worker)
            self._replace_later()
            raise
        if reply.get("recycle") or (self.config.recycle_after_tasks and worker.tasks >= self.config.recycle_after_tasks):
            self.stats.recycles += 1
            self._retire(worker)
            self._replace_later()
        else:
            self._release(worker)
        if not reply.get("ok"):
            raise _error_from_reply(reply)
        result = reply.get("result")
        return (result if isinstance(result, dict) else {}), data

    async def _acquire(self, cost: float) -> _Worker:
        """A free worker, handed out in the line's order (see _dispatch)."""
        waiter = self._line.add(cost)
        self._dispatch()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._line.discard(waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(waiter.future.result())  # handed over just as the caller left
            raise

    def _release(self, worker: _Worker) -> None:
        """A worker is free again: park it and serve the line."""
        if self._closed:
            self._retire(worker)
            return
        self._idle.append(worker)
        self._dispatch()

    def _dispatch(self) -> None:
        """Give free workers to waiters, cheapest first with aging. The last `reserved_for_light` free workers
        only take tasks costing at most `light_cost`: however many expensive tasks (hostile or not) queue up,
        a cheap one finds a worker at once; the CPU is then time-shared, so it finishes quickly."""
        while self._idle:
            reserved = len(self._idle) <= self.config.reserved_for_light
            waiter = self._line.pop(max_cost=self.config.light_cost if reserved else None)
            if waiter is None:
                return
            waiter.future.set_result(self._idle.pop())

    def _count_stop(self, reason: str) -> None:
        if reason == "cpu":
            self.stats.cpu_kills += 1
        elif reason == "wall":
            self.stats.wall_kills += 1
        else:
            self.stats.crashes += 1

    def terminate(self) -> None:
        """Kill every worker now, without an event loop (process shutdown). Use close() from async code."""
        self._closed = True
        for worker in list(self._workers):
            worker.kill(worker.killed_for or "retired")
            with contextlib.suppress(Exception):
                worker.reap(timeout=2.0)
            worker.close()
        self._workers.clear()
        self._io.shutdown(wait=False, cancel_futures=True)

    async def close(self) -> None:
        """Stop every worker. The server drained its calls before this, so busy workers are killed."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._starting):
            task.cancel()
        while (waiter := self._line.pop()) is not None:
            waiter.future.set_exception(ServingError(ErrorCode.UNAVAILABLE, f"the {self.name} pool is shut down"))
        workers = list(self._workers)
        for worker in workers:
            worker.kill(worker.killed_for or "retired")
        loop = asyncio.get_running_loop()
        for worker in workers:
            await loop.run_in_executor(None, worker.reap)
        await loop.run_in_executor(None, self._io.shutdown, True)  # I/O threads saw their pipes end
        self._watchdog.close()
        for worker in workers:
            worker.close()
        self._workers.clear()


def _error_from_reply(reply: dict[str, Any]) -> ServingError:
    try:
        code = ErrorCode(reply.get("code"))
    except ValueError:
        code = ErrorCode.INTERNAL
    message = str(reply.get("message") or "the worker failed without a message")
    return ServingError(code, message)
