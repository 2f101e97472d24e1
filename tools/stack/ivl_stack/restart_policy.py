"""When a child that died is started again: exponential backoff, and a crash-loop limit.

A child that exits is restarted after `backoff_s * 2**k` seconds (at most `max_backoff_s`), k being
the number of times it was restarted within the last `window_s` seconds; when it has already been
restarted `max_restarts` times within that window, it is given up (not restarted any more). A child
that stays up longer than the window starts again from the first, short backoff.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_restarts: int = 5
    window_s: float = 300.0


@dataclass
class RestartHistory:
    """The restarts of one child (monotonic times)."""

    policy: RestartPolicy
    times: list[float] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.times)

    def recent(self, now: float) -> int:
        return sum(1 for t in self.times if now - t < self.policy.window_s)

    def delay_after_exit(self, now: float) -> float | None:
        """Seconds to wait before the next start, or None: give up (crash loop)."""
        recent = self.recent(now)
        if recent >= self.policy.max_restarts:
            return None
        return min(self.policy.max_backoff_s, self.policy.backoff_s * 2**recent)

    def restarted(self, now: float) -> None:
        self.times.append(now)
