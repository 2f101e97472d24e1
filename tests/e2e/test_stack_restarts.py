"""The one-command stack survives crashes: real launcher, real children on loopback, SIGKILL.

One launcher runs through this module, test after test (as in tests/faults): the vision service is
killed (restarted; a chat with an image gets a clear 503 meanwhile, not a hang; afterwards chats work
again with no manual step), then the LLM, then Redis; then a child that keeps dying is given up after
the crash-loop limit while the rest keeps serving; then SIGTERM to the launcher while a child waits
for its restart leaves no process behind. Restart counts and states come from the launcher's /metrics.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import time

import pytest
from PIL import Image
from support.launcher_process import LauncherProcess, alive, group_alive

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed"),
]

BACKOFF_S = 2.0  # first restart after 2 s, then 4 s, 8 s...
MAX_RESTARTS = 2  # a child restarted twice within the window and dying again is given up
_colours = iter(range(1, 10_000))


def new_png() -> bytes:
    n = next(_colours)
    out = io.BytesIO()
    Image.new("RGB", (320, 240), ((n * 53) % 256, (n * 29) % 256, 90)).save(out, "PNG")
    return out.getvalue()


def wait_until(condition, timeout_s: float, what: str, step_s: float = 0.2) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(step_s)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def model(tiny_original, tmp_path_factory):
    """A copy of the tiny checkpoint this module may break (to make a child crash-loop)."""
    return shutil.copytree(tiny_original, tmp_path_factory.mktemp("restarts") / "checkpoint")


@pytest.fixture(scope="module")
def stack(model, tmp_path_factory):
    env = {"IVL_STACK_RESTART_BACKOFF_S": str(BACKOFF_S), "IVL_STACK_MAX_RESTARTS": str(MAX_RESTARTS),
           "IVL_STACK_RESTART_WINDOW_S": "3600"}
    launcher = LauncherProcess(tmp_path_factory.mktemp("launcher"), model, env=env).start()
    try:
        launcher.wait_ready()
        yield launcher
    finally:
        launcher.stop()


def _kill_and_recover(stack, service: str, during_outage) -> float:
    """SIGKILL `service`; check what clients get while it is down; return seconds to the next good chat."""
    old = stack.pids()[service]
    os.kill(old, signal.SIGKILL)
    killed_at = time.monotonic()
    during_outage()
    wait_until(lambda: stack.ready()["children"][service]["state"] != "up" or stack.pids()[service] != old, 30,
               f"the launcher to notice that {service} died")

    def back() -> bool:
        child = stack.ready()["children"][service]
        return child["state"] == "up" and child["pid"] != old

    wait_until(back, 180, f"{service} to be back")
    assert stack.metric("ivl_stack_child_up", service=service) == 1.0
    assert not alive(old), f"the killed {service} (pid {old}) is still there"
    assert alive(stack.pids()[service])
    return time.monotonic() - killed_at


def test_a_killed_vision_service_is_restarted_and_chats_work_again(stack):
    assert stack.chat("hello", new_png()).status_code == 200
    restarts = stack.metric("ivl_stack_restarts_total", service="vision")

    def during_outage() -> None:
        started = time.monotonic()
        down = stack.chat("what is this?", new_png())
        assert time.monotonic() - started < 30, "a chat during the outage hung"
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "unavailable" and "vision" in down.json()["error"]["message"]
        assert stack.chat("no image, please").status_code == 200  # the LLM still serves

    _kill_and_recover(stack, "vision", during_outage)
    # No manual step: image chats work again (the gateway's replica pool notices on its own).
    recovered = wait_until(lambda: stack.chat("and now?", new_png()).status_code == 200, 60,
                           "an image chat to work again")
    print(f"vision ready again -> first good image chat after {recovered:.1f} s")
    assert recovered < 15  # the gateway dials a replica that went away again every 2 s
    assert stack.metric("ivl_stack_restarts_total", service="vision") == restarts + 1
    log = stack.log()
    assert "vision exited with signal SIGKILL; restarting it in 2.0 s" in log and "vision is back" in log


def test_a_killed_llm_service_is_restarted_and_chats_work_again(stack):
    def during_outage() -> None:
        started = time.monotonic()
        down = stack.chat("hello?")
        assert time.monotonic() - started < 30, "a chat during the outage hung"
        assert down.status_code == 503 and "LLM" in down.json()["error"]["message"], down.text

    took = _kill_and_recover(stack, "llm", during_outage)
    wait_until(lambda: stack.chat("hello again").status_code == 200, 60, "a chat to work again")
    print(f"llm: SIGKILL -> restarted and ready in {took:.1f} s")
    assert stack.metric("ivl_stack_restarts_total", service="llm") == 1


def test_a_killed_redis_is_restarted_and_the_cache_works_again(stack):
    def during_outage() -> None:
        assert stack.chat("the cache is a cache", new_png()).status_code == 200  # served without it

    _kill_and_recover(stack, "redis", during_outage)
    image = new_png()

    def cache_hit() -> bool:
        reply = stack.chat("twice", image)
        return reply.status_code == 200 and reply.json()["ivl"]["cache_hits"] == 1

    wait_until(cache_hit, 60, "the second chat with one image to be a cache hit", step_s=1)


def test_a_crash_looping_child_is_given_up_and_the_rest_keeps_serving(stack, model):
    (model / "config.json").rename(model / "config.json.away")  # every new vision process now fails
    try:
        os.kill(stack.pids()["vision"], signal.SIGKILL)
        wait_until(lambda: stack.metric("ivl_stack_child_given_up", service="vision") == 1.0, 240,
                   "the crash-looping vision service to be given up")
    finally:
        (model / "config.json.away").rename(model / "config.json")
    assert stack.metric("ivl_stack_restarts_total", service="vision") == MAX_RESTARTS
    assert stack.ready()["children"]["vision"]["state"] == "given up"
    log = stack.log()
    assert "GIVING UP ON VISION" in log and "it is not restarted any more" in log
    # The launcher and the rest of the stack keep serving; image chats get a clear 503.
    assert stack.process.poll() is None
    assert stack.chat("still there?").status_code == 200
    down = stack.chat("and images?", new_png())
    assert down.status_code == 503 and "vision" in down.json()["error"]["message"]
    time.sleep(BACKOFF_S * 4)
    assert stack.metric("ivl_stack_restarts_total", service="vision") == MAX_RESTARTS  # no more restarts


def test_sigterm_while_a_child_waits_for_its_restart_leaves_no_process(stack, model):
    pids = stack.pids()
    (model / "config.json").rename(model / "config.json.away")
    os.kill(pids["llm"], signal.SIGKILL)  # restart 2 of the LLM comes after 4 s of backoff
    wait_until(lambda: "llm exited with signal SIGKILL; restarting it in 4.0 s" in stack.log(), 30,
               "the LLM's backoff", step_s=0.05)
    stack.signal(signal.SIGTERM)
    started = time.monotonic()
    code = stack.process.wait(timeout=60)
    assert code == 0, stack.log()[-3000:]
    assert time.monotonic() - started < 30
    log = stack.log()
    assert "stopped; no child process is left" in log
    assert "restarted llm" not in log.split("llm exited with signal SIGKILL; restarting it in 4.0 s")[-1]
    for name, pid in pids.items():
        assert not group_alive(pid), f"{name} (process group {pid}) still has processes"
    for name, port in stack.ports.items():
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"{name} port {port} still answers"
    (model / "config.json.away").rename(model / "config.json")
