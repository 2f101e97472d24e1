"""docker-compose.yml as Debian's docker-compose reads it: valid, both profiles, healthchecks, the model
folder mounted read-only, only the UI and the gateway published, one Dockerfile per service."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = "/usr/bin/docker-compose"
DOCKERFILES = {
    "vision-encoder": ("services/vision_encoder/Dockerfile", "./services/vision_encoder"),
    "llm": ("services/llm/Dockerfile", "./services/llm"),
    "llm-gpu": ("services/llm/Dockerfile", "./services/llm"),
    "gateway": ("gateway/Dockerfile", "./gateway"),
    "frontend": ("frontend/Dockerfile", "./frontend"),
}

pytestmark = pytest.mark.skipif(
    not Path(COMPOSE).exists() or shutil.which("docker-compose") is None,
    reason="Debian's docker-compose is not installed (apt-get install docker-compose)",
)


def _config(profile: str, tmp_path: Path) -> dict:
    env = {**os.environ, "MODEL_PATH": str(tmp_path)}
    result = subprocess.run(
        [COMPOSE, "-f", str(ROOT / "docker-compose.yml"), "--profile", profile, "config"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_config_is_valid_and_wires_the_stack(profile, tmp_path):
    services = _config(profile, tmp_path)["services"]
    llm = "llm" if profile == "cpu" else "llm-gpu"
    assert {"redis", "vision-encoder", llm, "gateway", "frontend"} <= set(services)
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        published = bool(service.get("ports"))
        assert published == (name in ("gateway", "frontend")), f"{name}: only the UI and gateway are published"
    grpc_checks = [services[n]["healthcheck"]["test"] for n in ("vision-encoder", llm)]
    assert all("grpc_health" in " ".join(test) for test in grpc_checks)
    assert "/health" in " ".join(services["gateway"]["healthcheck"]["test"])
    for name in ("vision-encoder", llm):
        (mount,) = services[name]["volumes"]
        assert mount["source"] == str(tmp_path) and mount["target"] == "/models/current" and mount["read_only"]
    redis_cmd = " ".join(services["redis"]["command"])
    assert "allkeys-lru" in redis_cmd and "--maxmemory" in redis_cmd
    gateway_env = services["gateway"]["environment"]
    assert gateway_env["IVL_GATEWAY_LLM_ADDRESSES"] == "llm:50052"
    assert gateway_env["IVL_GATEWAY_REDIS_URL"].startswith("redis://redis:")
    assert services["frontend"]["environment"]["IVL_FRONTEND_GATEWAY_ADDRESS"] == "gateway:50050"
    if profile == "gpu":
        gpu = services["llm-gpu"]
        assert gpu["runtime"] == "nvidia" and gpu["environment"]["IVL_LLM_BACKEND"] == "lmdeploy"
        assert "llm" in gpu["networks"]["default"]["aliases"]
    else:
        assert services["llm"]["environment"]["IVL_LLM_BACKEND"] == "transformers"


def test_each_dockerfile_installs_only_its_service_and_generates_the_stubs():
    for dockerfile, package in DOCKERFILES.values():
        text = (ROOT / dockerfile).read_text()
        assert "proto/generate.py" in text, dockerfile
        installs = [line for line in text.splitlines() if "./proto" in line and "install" in line]
        # The service is installed from its folder, or from the wheel a build stage made of it (a compiled part).
        wheels = [line for line in text.splitlines() if line.startswith("RUN pip wheel") and package in line]
        assert installs and (package in installs[0] or (wheels and "/wheels/" in installs[0])), dockerfile
        others = {p for _, p in DOCKERFILES.values()} - {package}
        assert not any(other in text for other in others), f"{dockerfile} installs another service"
    for dockerfile in ("gateway/Dockerfile", "frontend/Dockerfile"):
        runs = [line for line in (ROOT / dockerfile).read_text().splitlines() if line.startswith("RUN")]
        assert not any("torch" in line for line in runs), f"{dockerfile} must not install torch"
