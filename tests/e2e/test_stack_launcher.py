"""The one-command launcher (python -m ivl_stack) as a user runs it: real redis-server, vision, LLM,
gateway and UI processes on free ports; one chat through the OpenAI API; Ctrl-C leaves no process."""

from __future__ import annotations

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
from ivl_stack.settings import StackSettings
from support.redis_server import free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")

READY_TIMEOUT_S = 240


def _ports() -> dict[str, int]:
    return {name: free_port() for name in ("ui", "http", "grpc", "vision", "llm", "redis", "vision-metrics", "llm-metrics")}


def _argv(ports: dict[str, int], *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "ivl_stack"]
    for name, port in ports.items():
        argv += [f"--{name}-port", str(port)]
    return [*argv, *extra]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose only once reaped; report it as alive until then
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IVL_", "MODEL_PATH"))}
    env.update(PYTHONUNBUFFERED="1", IVL_VISION_TORCH_THREADS="1", IVL_LLM_TORCH_THREADS="1",
               IVL_VISION_WARMUP="false", IVL_LLM_WARMUP="false", HOME=str(tmp_path))
    return env


@pytest.mark.slow
def test_launcher_starts_everything_serves_a_chat_and_ctrl_c_leaves_no_process(tmp_path):
    ports, ready_file, log_path = _ports(), tmp_path / "ready.json", tmp_path / "stack.log"
    argv = _argv(ports, "--cache-dir", str(tmp_path / "cache"), "--ready-file", str(ready_file))
    started = time.monotonic()
    with log_path.open("w") as log:
        launcher = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_env(tmp_path))
        try:
            while not ready_file.exists():
                assert launcher.poll() is None, f"launcher exited early:\n{log_path.read_text()[-4000:]}"
                assert time.monotonic() - started < READY_TIMEOUT_S, log_path.read_text()[-4000:]
                time.sleep(0.2)
            ready = json.loads(ready_file.read_text())
            pids = ready["pids"]
            assert set(pids) == {"redis", "vision", "llm", "gateway", "ui"}
            assert all(_alive(pid) for pid in pids.values())
            # The tiny demo checkpoint was written because no MODEL_PATH was given.
            assert Path(ready["model_path"]).joinpath("config.json").is_file()
            assert ready["ui"] == f"http://127.0.0.1:{ports['ui']}"
            # The UI page answers, and one chat goes through the gateway's OpenAI API.
            assert httpx.get(ready["ui"] + "/", timeout=10).status_code == 200
            reply = httpx.post(
                f"http://127.0.0.1:{ports['http']}/v1/chat/completions",
                json={"max_tokens": 5, "messages": [{"role": "user", "content": "hello"}]},
                timeout=60,
            )
            # The model services' own metrics ports (the launcher turns them on).
            vision_metrics = httpx.get(f"http://127.0.0.1:{ports['vision-metrics']}/metrics", timeout=10).text
            llm_metrics = httpx.get(f"http://127.0.0.1:{ports['llm-metrics']}/metrics", timeout=10).text
            assert "vision_queued_tiles{" in vision_metrics and "llm_requests_waiting{" in llm_metrics
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] >= 1
            # Redis runs with the cache's memory cap and LRU policy.
            with socket.create_connection(("127.0.0.1", ports["redis"]), timeout=5) as conn:
                conn.sendall(b"CONFIG GET maxmemory-policy\r\n")
                time.sleep(0.2)
                assert b"allkeys-lru" in conn.recv(256)
        finally:
            launcher.send_signal(signal.SIGINT)
            code = launcher.wait(timeout=60)
    output = log_path.read_text()
    assert code == 0, output[-4000:]
    assert "the InternVL stack is ready" in output and "stopped; no child process is left" in output
    for name, pid in pids.items():
        assert not _alive(pid), f"{name} (pid {pid}) is still running after Ctrl-C"
    for port in ports.values():
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"


def test_launcher_refuses_a_busy_port_and_a_missing_model_with_clear_messages(tmp_path):
    ports = _ports()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports["ui"]))
        busy.listen()
        result = subprocess.run(_argv(ports, "--model-path", str(tmp_path)), capture_output=True, text=True,
                                env=_env(tmp_path), timeout=60)
    assert result.returncode == 1
    assert f"port {ports['ui']} (ui_port) is already in use" in result.stdout and "--ui-port" in result.stdout
    result = subprocess.run(_argv(ports, "--model-path", str(tmp_path / "nowhere")), capture_output=True,
                            text=True, env=_env(tmp_path), timeout=60)
    assert result.returncode == 1 and "is not a folder" in result.stdout
    result = subprocess.run(_argv(ports, "--model-path", str(tmp_path)), capture_output=True,
                            text=True, env=_env(tmp_path), timeout=60)
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
