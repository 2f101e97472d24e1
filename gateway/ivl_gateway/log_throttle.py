"""Repeated warnings, logged once per interval: the first occurrence of a kind at once, later ones folded
into a count that the next logged line reports ("... (41 more like this in the last 60 s)").

    throttle = LogThrottle(interval_s=60)
    throttle.warning(log, "redis-down", "Redis unavailable (%s)", error)

`ThrottleFilter(throttle)` does the same for a logger we don't own (uvicorn's "Invalid HTTP request
received." lines): every record with the same message template shares one budget.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field


@dataclass
class _Slot:
    last_logged: float = float("-inf")
    suppressed: int = 0


@dataclass
class LogThrottle:
    interval_s: float = 60.0
    max_kinds: int = 1024  # bounded memory even if a caller builds kinds from untrusted input
    _slots: dict[str, _Slot] = field(default_factory=dict)

    def admit(self, kind: str, now: float | None = None) -> tuple[bool, int]:
        """(log it now?, how many of this kind were suppressed since the last logged one)."""
        now = time.monotonic() if now is None else now
        slot = self._slots.get(kind)
        if slot is None:
            if len(self._slots) >= self.max_kinds:
                self._slots.pop(next(iter(self._slots)))
            slot = self._slots[kind] = _Slot()
        if now - slot.last_logged >= self.interval_s:
            suppressed, slot.suppressed, slot.last_logged = slot.suppressed, 0, now
            return True, suppressed
        slot.suppressed += 1
        return False, 0

    def log(self, logger: logging.Logger, level: int, kind: str, message: str, *args: object) -> bool:
        """Log `message % args` unless a line of this kind was logged less than interval_s ago."""
        allowed, suppressed = self.admit(kind)
        if allowed:
            if suppressed:
                message += f" ({suppressed} more like this in the last {self.interval_s:g} s)"
            logger.log(level, message, *args)
        return allowed

    def warning(self, logger: logging.Logger, kind: str, message: str, *args: object) -> bool:
        return self.log(logger, logging.WARNING, kind, message, *args)

    def info(self, logger: logging.Logger, kind: str, message: str, *args: object) -> bool:
        return self.log(logger, logging.INFO, kind, message, *args)


class ThrottleFilter(logging.Filter):
    """A logging filter: records of level >= `min_level` with the same message template pass once per
    interval; the next one that passes carries the count of those dropped."""

    def __init__(self, throttle: LogThrottle, min_level: int = logging.WARNING) -> None:
        super().__init__()
        self._throttle = throttle
        self._min_level = min_level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self._min_level:
            return True
        allowed, suppressed = self._throttle.admit(f"{record.name}:{record.msg}")
        if allowed and suppressed:
            record.msg = f"{record.msg} ({suppressed} more like this in the last {self._throttle.interval_s:g} s)"
        return allowed
