"""The one-command launcher (python -m ivl_stack) as a real process on free loopback ports, for tests.

    with LauncherProcess(tmp_path, model_path, env={"IVL_STACK_MAX_RESTARTS": "2"}) as stack:
        stack.wait_ready()            # the ready file is written (every child answered its probe)
        stack.pids()                  # {"redis": ..., "vision": ..., ...} (current: rewritten on restarts)
        stack.metric("ivl_stack_restarts_total", service="vision")
        stack.log()                   # everything the launcher printed so far
        stack.chat(text, image)       # one OpenAI-API chat through the gateway (httpx.Response)
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from support.redis_server import free_port

SERVICES = ("ui", "http", "grpc", "vision", "llm", "redis", "metrics", "vision-metrics", "llm-metrics")


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def group_alive(pgid: int) -> bool:
    """True while any process of the process group exists (each child is its own group)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(alive(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(int(p.name)) == pgid)


def _pgid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return -1


def clean_env(home: Path, pin_services: bool = True, **extra: str) -> dict[str, str]:
    """This environment without IVL_*/MODEL_PATH variables. pin_services: the model services get 1 torch thread
    and no warm-up (light tests); False leaves threads, warm-up and OpenMP (no OMP_* variable) to the launcher (benchmarks)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IVL_", "MODEL_PATH"))}
    env.update(PYTHONUNBUFFERED="1", HOME=str(home))
    if pin_services:
        env.update(IVL_VISION_TORCH_THREADS="1", IVL_LLM_TORCH_THREADS="1", IVL_VISION_WARMUP="false",
                   IVL_LLM_WARMUP="false")
    else:
        env = {k: v for k, v in env.items() if not k.startswith("OMP_")}
    env.update(extra)
    return env


class LauncherProcess:
    def __init__(self, tmp_path: Path, model_path: Path | None, *extra_args: str, env: dict[str, str] | None = None,
                 no_ui: bool = True, pin_services: bool = True) -> None:
        self.ports = {name: free_port() for name in SERVICES}
        self.ready_file = tmp_path / "ready.json"
        self.log_path = tmp_path / "stack.log"
        argv = [sys.executable, "-m", "ivl_stack", "--ready-file", str(self.ready_file),
                "--cache-dir", str(tmp_path / "cache")]
        for name, port in self.ports.items():
            argv += [f"--{name}-port", str(port)]
        if model_path is not None:
            argv += ["--model-path", str(model_path)]
        if no_ui:
            argv.append("--no-ui")
        self.argv = [*argv, *extra_args]
        self.env = clean_env(tmp_path, pin_services, **(env or {}))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    def start(self) -> LauncherProcess:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def __enter__(self) -> LauncherProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 300) -> dict[str, Any]:
        started = time.monotonic()
        while not self.ready_file.exists():
            assert self.process is not None and self.process.poll() is None, f"launcher exited:\n{self.log()[-4000:]}"
            assert time.monotonic() - started < timeout_s, f"not ready after {timeout_s} s:\n{self.log()[-4000:]}"
            time.sleep(0.2)
        return self.ready()

    def ready(self) -> dict[str, Any]:
        return json.loads(self.ready_file.read_text())

    def pids(self) -> dict[str, int]:
        return dict(self.ready()["pids"])

    def metric(self, name: str, **labels: str) -> float | None:
        text = httpx.get(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return None

    def served_model(self) -> str:
        """The name the gateway serves (it answers 404 for any other name, as OpenAI does)."""
        models = httpx.get(f"{self.http_url}/v1/models", timeout=10).json()["data"]
        return str(models[0]["id"])

    def chat(self, text: str, image: bytes | None = None, timeout_s: float = 60, max_tokens: int = 3) -> httpx.Response:
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if image is not None:
            url = "data:image/png;base64," + base64.b64encode(image).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        body = {"model": self.served_model(), "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}
        return httpx.post(f"{self.http_url}/v1/chat/completions", json=body, timeout=timeout_s)

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout_s: float = 60) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode
