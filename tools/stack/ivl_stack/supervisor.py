"""Supervisor: keeps a ready stack serving when one of its children dies.

A child that exits is restarted with backoff (restart_policy.py); a restarted child counts as up
again once its readiness probe passes. A child that crash-loops is given up: the launcher says so
loudly and the rest of the stack keeps serving (the gateway answers 503 for what needs it). Every
change is logged, counted in StackMetrics and reported to `on_change` (the ready file).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ivl_stack.children import Child, ChildGroup, describe_exit
from ivl_stack.restart_policy import RestartHistory, RestartPolicy
from ivl_stack.services import ServiceSpec
from ivl_stack.stack_metrics import StackMetrics


class State(StrEnum):
    UP = "up"
    STARTING = "starting"  # restarted, its readiness probe has not passed yet
    BACKOFF = "backoff"  # died; waiting to be restarted
    GIVEN_UP = "given up"  # crash-looped; not restarted any more


@dataclass
class Supervised:
    child: Child
    spec: ServiceSpec
    history: RestartHistory
    state: State = State.UP
    since: float = 0.0  # when the current state began
    restart_at: float = 0.0
    down_since: float = 0.0
    last_exit: str = ""


class Supervisor:
    def __init__(
        self,
        group: ChildGroup,
        specs: Mapping[str, ServiceSpec],
        policy: RestartPolicy,
        metrics: StackMetrics,
        say: Callable[[str], None],
        *,
        ready_timeout_s: float,
        stop_grace_s: float,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._group = group
        self._policy = policy
        self._metrics = metrics
        self._say = say
        self._ready_timeout_s = ready_timeout_s
        self._stop_grace_s = stop_grace_s
        self._on_change = on_change
        self._clock = clock
        now = clock()
        self.items = [
            Supervised(child, specs[child.name], RestartHistory(policy), since=now) for child in group.children
        ]

    def tick(self) -> None:
        now = self._clock()
        for item in self.items:
            self._step(item, now)

    def all_given_up(self) -> bool:
        return all(item.state is State.GIVEN_UP for item in self.items)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            item.child.name: {
                "state": item.state.value, "pid": item.child.pid, "restarts": item.history.total,
                "last_exit": item.last_exit,
            }
            for item in self.items
        }

    def _step(self, item: Supervised, now: float) -> None:
        if item.state in (State.UP, State.STARTING):
            code = item.child.exit_code()
            if code is not None:
                self._exited(item, code, now)
            elif item.state is State.STARTING:
                self._check_started(item, now)
        elif item.state is State.BACKOFF and now >= item.restart_at:
            self._restart(item, now)

    def _exited(self, item: Supervised, code: int, now: float) -> None:
        name = item.child.name
        item.child.reap()
        item.last_exit = describe_exit(code)
        self._metrics.up.labels(name).set(0)
        if item.state is State.UP:
            item.down_since = now
        delay = item.history.delay_after_exit(now)
        if delay is None:
            self._give_up(item, now)
            return
        item.state, item.since, item.restart_at = State.BACKOFF, now, now + delay
        self._say(
            f"{name} exited with {item.last_exit}; restarting it in {delay:.1f} s (restart "
            f"{item.history.total + 1}; after {self._policy.max_restarts} restarts within "
            f"{self._policy.window_s:.0f} s it is given up)"
        )
        self._on_change()

    def _give_up(self, item: Supervised, now: float) -> None:
        name = item.child.name
        item.state, item.since = State.GIVEN_UP, now
        self._metrics.given_up.labels(name).set(1)
        for line in (
            f"{'*' * 20} GIVING UP ON {name.upper()} {'*' * 20}",
            f"{name} exited again ({item.last_exit}) after {item.history.recent(now)} restarts within "
            f"{self._policy.window_s:.0f} s: it is not restarted any more.",
            f"The rest of the stack keeps serving; what needs {name} fails with a clear error until you fix "
            "the cause (its log is above) and restart the stack.",
        ):
            self._say(line)
        self._on_change()

    def _restart(self, item: Supervised, now: float) -> None:
        self._group.restart(item.child)
        item.history.restarted(now)
        item.state, item.since = State.STARTING, now
        self._metrics.restarts.labels(item.child.name).inc()
        self._say(f"restarted {item.child.name} (pid {item.child.pid}, restart {item.history.total})")
        self._on_change()

    def _check_started(self, item: Supervised, now: float) -> None:
        if item.spec.probe():
            item.state, item.since = State.UP, now
            self._metrics.up.labels(item.child.name).set(1)
            self._say(
                f"{item.child.name} is back at {item.spec.endpoint} ({now - item.down_since:.1f} s after it died)"
            )
            self._on_change()
        elif now - item.since > self._ready_timeout_s:
            self._say(f"{item.child.name} was not ready {self._ready_timeout_s:.0f} s after its restart; stopping it")
            item.child.terminate()
            item.child.wait_stopped(time.monotonic() + self._stop_grace_s)  # the next tick sees it exited
