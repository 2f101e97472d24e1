"""Launcher: starts Redis, the vision encoder and the LLM, the gateway and the UI in order, waits for
each to be healthy, prints where everything is, supervises (a child that dies is restarted with
backoff, a crash-looping one given up: supervisor.py), serves its own /metrics, and stops all of it
on Ctrl-C/SIGTERM, also while a child waits to be restarted."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import IO

from ivl_stack.children import Child, ChildGroup
from ivl_stack.readiness import NotReady, port_in_use, wait_ready
from ivl_stack.restart_policy import RestartPolicy
from ivl_stack.services import ServiceSpec, frontend_spec, gateway_spec, model_specs, redis_spec
from ivl_stack.settings import PORT_FIELDS, StackSettings
from ivl_stack.stack_metrics import StackMetrics
from ivl_stack.supervisor import Supervisor
from ivl_stack.tiny_model import check_model_path, ensure_demo_checkpoint, trained_demo_model

SUPERVISE_INTERVAL_S = 0.5


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class Launcher:
    def __init__(self, settings: StackSettings, out: IO[str], env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.group = ChildGroup(out, colors=out.isatty())
        self.env = dict(os.environ if env is None else env)
        self.started = time.monotonic()
        self.specs: dict[str, ServiceSpec] = {}
        self.metrics = StackMetrics()
        self.supervisor: Supervisor | None = None
        self.endpoints: dict[str, str] = {}

    def say(self, text: str) -> None:
        self.group.say(f"[ivl-stack] {text}")

    def run(self) -> int:
        """Start everything, then block until Ctrl-C/SIGTERM (exit 0) or a child dies (exit 1)."""
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            self._check_ports()
            self.endpoints = self._start_all()
            self._serve_metrics()
            self.supervisor = self._supervisor()
            self._announce(self.endpoints)
            return self._supervise(self.supervisor)
        except KeyboardInterrupt:
            self.say("interrupted")
            return 0
        except (NotReady, ValueError, FileNotFoundError, RuntimeError, OSError) as error:
            self.say(f"error: {error}")
            return 1
        finally:
            # A second Ctrl-C or a SIGTERM must not cut the cleanup short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._stop_all()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)

    def _check_ports(self) -> None:
        host = self.settings.connect_host()
        for name in PORT_FIELDS:
            port = getattr(self.settings, name)
            if port and port_in_use(host, port):
                flag = "--" + name.replace("_", "-")
                raise OSError(
                    f"port {port} ({name}) is already in use on {host}; stop what holds it or pass {flag} "
                    f"(or IVL_STACK_{name.upper()})"
                )

    def _model_path(self) -> Path:
        if self.settings.model_path:
            return check_model_path(self.settings.model_path)
        trained = None if self.settings.random_demo else trained_demo_model()
        if trained is not None:
            self.say(f"no MODEL_PATH given: using the trained tiny demo model {trained} (what it can answer: "
                     "docs/demo_model.md)")
            return trained
        self.say(f"no MODEL_PATH given: using the offline tiny random demo checkpoint under {self.settings.cache_dir}")
        folder, written = ensure_demo_checkpoint(self.settings.cache_dir)
        if written:
            self.say(f"wrote the tiny demo checkpoint to {folder}")
        return folder

    def _launch(self, specs: list[ServiceSpec]) -> None:
        children: list[tuple[ServiceSpec, Child]] = []
        for spec in specs:
            self.say(f"starting {spec.name}: {' '.join(spec.argv[:4])}")
            self.specs[spec.name] = spec
            self.metrics.add(spec.name)
            children.append((spec, self.group.start(spec.name, spec.argv, spec.env)))
        for spec, child in children:
            waited = wait_ready(spec.name, spec.probe, child.exit_code, self.settings.ready_timeout_s)
            self.metrics.up.labels(spec.name).set(1)
            self.say(f"{spec.name} ready at {spec.endpoint} (+{waited:.1f} s, {self.elapsed():.1f} s since start)")

    def _start_all(self) -> dict[str, str]:
        """Redis first; then the model services, the gateway and the UI all at once (their imports and
        weight loading overlap), waited for in dependency order."""
        model_path = self._model_path()
        redis = redis_spec(self.settings, self.env)
        self._launch([redis])
        gateway = gateway_spec(self.settings, redis.endpoint, self.env)
        specs = [*model_specs(self.settings, model_path, self.env), gateway]
        endpoints = {"model_path": str(model_path), "redis": redis.endpoint, "http": gateway.endpoint,
                     "grpc": f"{self.settings.connect_host()}:{self.settings.grpc_port}"}
        if not self.settings.no_ui:
            ui = frontend_spec(self.settings, self.env)
            specs.append(ui)
            endpoints["ui"] = ui.endpoint
        self._launch(specs)
        return endpoints

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _serve_metrics(self) -> None:
        if self.settings.metrics_port:
            host = "127.0.0.1"  # the launcher's metrics stay on loopback, whatever --host says
            self.metrics.serve(host, self.settings.metrics_port)
            self.endpoints["metrics"] = f"http://{host}:{self.settings.metrics_port}/metrics"

    def _announce(self, endpoints: dict[str, str]) -> None:
        http = endpoints["http"]
        lines = [
            f"the InternVL stack is ready in {self.elapsed():.1f} s (model: {endpoints['model_path']})",
            *([f"  UI (open in a browser):  {endpoints['ui']}"] if "ui" in endpoints else []),
            f"  OpenAI-compatible API:   {http}/v1/chat/completions  (models: {http}/v1/models)",
            f"  gateway gRPC:            {endpoints['grpc']}  (ivl.gateway.v1.Chat)",
            f"  health / metrics:        {http}/health  {http}/metrics",
            *([f"  launcher metrics:        {endpoints['metrics']}  (restarts, children up)"]
              if "metrics" in endpoints else []),
            "press Ctrl-C to stop everything",
        ]
        for line in lines:
            self.say(line)
        self._write_ready_file()

    def _write_ready_file(self) -> None:
        """The URLs, the current child pids and their states (rewritten after every restart)."""
        if self.settings.ready_file is None:
            return
        payload: dict[str, object] = {
            **self.endpoints, "ready_s": round(self.elapsed(), 3), "pids": self.group.pids(),
            "launcher_pid": os.getpid(),
        }
        if self.supervisor is not None:
            payload["children"] = self.supervisor.snapshot()
        tmp = self.settings.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(self.settings.ready_file)

    def _supervisor(self) -> Supervisor:
        settings = self.settings
        policy = RestartPolicy(
            backoff_s=settings.restart_backoff_s, max_backoff_s=settings.restart_max_backoff_s,
            max_restarts=settings.max_restarts, window_s=settings.restart_window_s,
        )
        return Supervisor(
            self.group, self.specs, policy, self.metrics, self.say, ready_timeout_s=settings.ready_timeout_s,
            stop_grace_s=settings.stop_grace_s, on_change=self._write_ready_file,
        )

    def _supervise(self, supervisor: Supervisor) -> int:
        """Until Ctrl-C/SIGTERM: restart what dies (supervisor.py); exit 1 only if everything was given up."""
        while True:
            supervisor.tick()
            if supervisor.all_given_up():
                self.say("every service was given up; nothing is left to serve")
                return 1
            time.sleep(SUPERVISE_INTERVAL_S)

    def _stop_all(self) -> None:
        self.metrics.close()
        if not self.group.children:
            return
        self.group.stop_all(self.settings.stop_grace_s, on_stop=lambda c: self.say(f"stopping {c.name}"))
        self.say("stopped; no child process is left")
