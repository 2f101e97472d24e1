"""Polling for a condition in tests: one helper instead of a copy per test module.

    waited_s = wait_until(lambda: service.ready(), 30, "the service to be ready", step_s=0.2)
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], object], timeout_s: float, what: str, step_s: float = 0.05) -> float:
    """Seconds until `condition()` held (checked every `step_s`); AssertionError naming `what` after timeout_s."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(step_s)
    return time.monotonic() - start
