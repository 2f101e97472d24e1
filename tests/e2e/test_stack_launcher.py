"""The one-command launcher (python -m ivl_stack) as a user runs it: real redis-server, vision, LLM,
gateway and UI processes on free loopback ports, and real crashes (SIGKILL).

One launcher runs through the tests of this module, in order (as in tests/faults): it starts
everything (the tiny demo checkpoint written because no MODEL_PATH is given) and serves a chat; the
vision service is killed (restarted; a chat with an image gets a clear 503 meanwhile, not a hang;
afterwards chats work again with no manual step), then the LLM, then Redis; a child that keeps dying
is given up after the crash-loop limit while the rest keeps serving; SIGTERM to the launcher while a
child waits for its restart stops everything and leaves no process (Ctrl-C takes the same path).
Restart counts and states come from the launcher's own /metrics and its ready file.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from ivl_stack.restart_policy import RestartHistory, RestartPolicy
from ivl_stack.settings import StackSettings
from ivl_stack.tiny_model import TRAINED_DEMO_MODEL
from PIL import Image
from support.launcher_process import SERVICES, LauncherProcess, alive, clean_env, group_alive
from support.redis_server import free_port
from support.waiting import wait_until

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

BACKOFF_S = 2.0  # first restart after 2 s, then 4 s, 8 s...
MAX_RESTARTS = 2  # a child restarted twice within the window and dying again is given up
_colours = iter(range(1, 10_000))

wait_until = functools.partial(wait_until, step_s=0.2)


def new_png() -> bytes:
    n = next(_colours)
    out = io.BytesIO()
    Image.new("RGB", (320, 240), ((n * 53) % 256, (n * 29) % 256, 90)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    env = {"IVL_STACK_RESTART_BACKOFF_S": str(BACKOFF_S), "IVL_STACK_MAX_RESTARTS": str(MAX_RESTARTS),
           "IVL_STACK_RESTART_WINDOW_S": "3600"}
    launcher = LauncherProcess(tmp_path_factory.mktemp("launcher"), None, env=env, no_ui=False).start()
    try:
        launcher.wait_ready(timeout_s=300)
        yield launcher
    finally:
        launcher.stop()


@pytest.mark.slow
def test_launcher_starts_everything_and_serves_a_chat(stack):
    ready = stack.ready()
    pids = ready["pids"]
    assert set(pids) == {"redis", "vision", "llm", "gateway", "ui"}
    assert all(alive(pid) for pid in pids.values())
    # No MODEL_PATH: the committed trained demo model is served.
    assert Path(ready["model_path"]) == TRAINED_DEMO_MODEL
    assert ready["ui"] == f"http://127.0.0.1:{stack.ports['ui']}"
    assert ready["metrics"] == f"http://127.0.0.1:{stack.ports['metrics']}/metrics"
    assert stack.metric("ivl_stack_child_up", service="vision") == 1.0
    assert stack.metric("ivl_stack_restarts_total", service="llm") == 0.0
    # The model services' own metrics ports (the launcher turns them on).
    vision_metrics = httpx.get(f"http://127.0.0.1:{stack.ports['vision-metrics']}/metrics", timeout=10).text
    llm_metrics = httpx.get(f"http://127.0.0.1:{stack.ports['llm-metrics']}/metrics", timeout=10).text
    assert "vision_queued_tiles{" in vision_metrics and "llm_requests_waiting{" in llm_metrics
    # The UI page answers, and one chat goes through the gateway's OpenAI API.
    assert httpx.get(ready["ui"] + "/", timeout=10).status_code == 200
    reply = stack.chat("hello", max_tokens=5)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1
    # Redis runs with the cache's memory cap and LRU policy.
    with socket.create_connection(("127.0.0.1", stack.ports["redis"]), timeout=5) as conn:
        conn.sendall(b"CONFIG GET maxmemory-policy\r\n")
        time.sleep(0.2)
        assert b"allkeys-lru" in conn.recv(256)
    assert "the InternVL stack is ready" in stack.log()


def _kill_and_recover(stack, service: str, during_outage) -> float:
    """SIGKILL `service`; check what clients get while it is down; return seconds until it is back."""
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


@pytest.mark.slow
def test_a_killed_vision_service_is_restarted_and_chats_work_again(stack):
    first = stack.chat("hello", new_png())
    assert first.status_code == 200, first.text

    def during_outage() -> None:
        started = time.monotonic()
        down = stack.chat("what is this?", new_png())
        print(f"vision down: an image chat got {down.status_code} after {time.monotonic() - started:.2f} s")
        assert time.monotonic() - started < 30, "a chat during the outage hung"
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "unavailable" and "vision" in down.json()["error"]["message"]
        assert stack.chat("no image, please").status_code == 200  # the LLM still serves

    took = _kill_and_recover(stack, "vision", during_outage)
    # No manual step: image chats work again (the gateway's replica pool notices on its own).
    recovered = wait_until(lambda: stack.chat("and now?", new_png()).status_code == 200, 60,
                           "an image chat to work again")
    print(f"vision: SIGKILL -> ready again in {took:.1f} s -> first good image chat {recovered:.1f} s later")
    assert recovered < 15  # the gateway dials a replica that went away again every 2 s
    assert stack.metric("ivl_stack_restarts_total", service="vision") == 1
    log = stack.log()
    assert "vision exited with signal SIGKILL; restarting it in 2.0 s" in log and "vision is back" in log


@pytest.mark.slow
def test_a_killed_llm_service_is_restarted_and_chats_work_again(stack):
    def during_outage() -> None:
        started = time.monotonic()
        down = stack.chat("hello?")
        print(f"llm down: a chat got {down.status_code} after {time.monotonic() - started:.2f} s")
        assert time.monotonic() - started < 30, "a chat during the outage hung"
        assert down.status_code == 503 and "LLM" in down.json()["error"]["message"], down.text

    took = _kill_and_recover(stack, "llm", during_outage)
    recovered = wait_until(lambda: stack.chat("hello again").status_code == 200, 60, "a chat to work again")
    print(f"llm: SIGKILL -> ready again in {took:.1f} s -> first good chat {recovered:.1f} s later")
    assert stack.metric("ivl_stack_restarts_total", service="llm") == 1


@pytest.mark.slow
def test_a_killed_redis_is_restarted_and_the_cache_works_again(stack):
    def during_outage() -> None:
        assert stack.chat("the cache is a cache", new_png()).status_code == 200  # served without it

    _kill_and_recover(stack, "redis", during_outage)
    image = new_png()

    def cache_hit() -> bool:
        reply = stack.chat("twice", image)
        return reply.status_code == 200 and reply.json()["ivl"]["cache_hits"] == 1

    wait_until(cache_hit, 60, "the second chat with one image to be a cache hit", step_s=1)


@pytest.mark.slow
def test_a_crash_looping_child_is_given_up_and_the_rest_keeps_serving(stack):
    config = Path(stack.ready()["model_path"]) / "config.json"
    config.rename(config.with_suffix(".away"))  # every new vision process now fails to load
    try:
        os.kill(stack.pids()["vision"], signal.SIGKILL)
        wait_until(lambda: stack.metric("ivl_stack_child_given_up", service="vision") == 1.0, 240,
                   "the crash-looping vision service to be given up")
    finally:
        config.with_suffix(".away").rename(config)
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


@pytest.mark.slow
def test_sigterm_while_a_child_waits_for_its_restart_leaves_no_process(stack):
    pids = stack.pids()
    os.kill(pids["llm"], signal.SIGKILL)  # restart 2 of the LLM comes after 4 s of backoff
    waiting = "llm exited with signal SIGKILL; restarting it in 4.0 s"
    wait_until(lambda: waiting in stack.log(), 30, "the LLM's backoff", step_s=0.05)
    stack.signal(signal.SIGTERM)
    started = time.monotonic()
    code = stack.process.wait(timeout=60)
    assert code == 0, stack.log()[-3000:]
    assert time.monotonic() - started < 30
    log = stack.log()
    assert "stopped; no child process is left" in log
    assert "restarted llm" not in log.split(waiting)[-1]  # stopped during the backoff, not restarted
    for name, pid in pids.items():
        assert not group_alive(pid), f"{name} (process group {pid}) still has processes"
    for name, port in stack.ports.items():
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"{name} port {port} still answers"


def _argv(ports: dict[str, int], *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "ivl_stack"]
    for name, port in ports.items():
        argv += [f"--{name}-port", str(port)]
    return [*argv, *extra]


def test_launcher_refuses_a_busy_port_and_a_missing_model_with_clear_messages(tmp_path):
    ports = {name: free_port() for name in SERVICES}
    env = clean_env(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports["ui"]))
        busy.listen()
        result = subprocess.run(_argv(ports, "--model-path", str(tmp_path)), capture_output=True, text=True,
                                env=env, timeout=60)
    assert result.returncode == 1
    assert f"port {ports['ui']} (ui_port) is already in use" in result.stdout and "--ui-port" in result.stdout
    result = subprocess.run(_argv(ports, "--model-path", str(tmp_path / "nowhere")), capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 1 and "is not a folder" in result.stdout
    result = subprocess.run(_argv(ports, "--model-path", str(tmp_path)), capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 1 and "has no config.json" in result.stdout


def test_settings_check_ports_and_modes(monkeypatch):
    monkeypatch.setenv("MODEL_PATH", "/models/x")
    monkeypatch.setenv("IVL_STACK_UI_PORT", "9000")
    settings = StackSettings()
    assert settings.model_path == "/models/x" and settings.ui_port == 9000
    assert (settings.http_port, settings.grpc_port, settings.vision_port, settings.llm_port) == (8000, 50050, 50051, 50052)
    assert settings.resolved_backend() == "transformers" and settings.resolved_dtype() == "float32"
    gpu = StackSettings(gpu=True)
    assert (gpu.resolved_device(), gpu.resolved_backend(), gpu.resolved_dtype()) == ("cuda", "lmdeploy", "bfloat16")
    with pytest.raises(ValueError, match="both 9000"):
        StackSettings(http_port=9000)
    with pytest.raises(ValueError, match="lmdeploy backend needs a GPU"):
        StackSettings(backend="lmdeploy")


def test_restart_policy_backs_off_exponentially_and_gives_up_on_a_crash_loop():
    history = RestartHistory(RestartPolicy(backoff_s=1, max_backoff_s=5, max_restarts=4, window_s=100))
    delays = []
    now = 0.0
    for _ in range(4):
        delay = history.delay_after_exit(now)
        delays.append(delay)
        now += delay
        history.restarted(now)
        now += 1  # dies again a second after each restart
    assert delays == [1, 2, 4, 5]  # doubling, capped
    assert history.delay_after_exit(now) is None  # the 4 restarts are within 100 s: given up
    # A child that stayed up longer than the window starts again from the short backoff.
    assert history.delay_after_exit(now + 200) == 1 and history.total == 4
    with pytest.raises(ValueError, match="metrics_port and ui_port are both 9000"):
        StackSettings(ui_port=9000, metrics_port=9000)
    assert StackSettings(metrics_port=0).metrics_port == 0  # 0 = no launcher metrics endpoint


def test_the_model_choice_without_a_model_path(tmp_path):
    """No model path: the committed trained demo model; --random-demo: the tiny random checkpoint, written
    once into the cache folder; a model path: that folder, checked."""
    from ivl_stack.launcher import Launcher

    def chosen(**fields) -> Path:
        return Launcher(StackSettings(cache_dir=tmp_path / "cache", **fields), io.StringIO())._model_path()

    assert chosen() == TRAINED_DEMO_MODEL
    random_model = chosen(random_demo=True)
    assert random_model.is_relative_to(tmp_path / "cache")
    assert json.loads((random_model / "config.json").read_text())["ivl_random_weights"] is True
    assert chosen(model_path=str(TRAINED_DEMO_MODEL)) == TRAINED_DEMO_MODEL
