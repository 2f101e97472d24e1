"""readOnlyRootFilesystem holds: the vision, LLM, gateway and UI processes start and serve a chat with every
mount read-only except a fresh /tmp (the manifests' emptyDir) and the model folder read-only, each with the
environment its manifest (cpu-demo) and its image's ENV give it. A private mount namespace (`unshare -rm`)
stands in for the container; real processes, real tiny checkpoint, real redis-server, the real openai client."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from k8s_render import ROOT, env_values, main_container
from PIL import Image
from support.redis_server import RedisServer, free_port
from support.service_processes import GatewayProcess, ServiceProcess

WRAPPER = Path(__file__).with_name("read_only_root.sh")
DOCKERFILES = {
    "vision": "services/vision_encoder/Dockerfile",
    "llm": "services/llm/Dockerfile",
    "gateway": "gateway/Dockerfile",
    "frontend": "frontend/Dockerfile",
}
SECRETS = {"gateway-api-keys": "ui-key,client-key", "frontend-gateway-api-key": "ui-key"}


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10, check=False)
    return probe.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _namespaces_work(), reason="unshare -rm (user + mount namespaces) is not permitted here"),
]


def _image_env(dockerfile: str) -> dict[str, str]:
    """KEY=VALUE pairs of the Dockerfile's ENV lines (the image's environment), last stage wins."""
    text = (ROOT / dockerfile).read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def _manifest_env(tree, deployment: str) -> dict[str, str]:
    out = {}
    for name, entry in env_values(main_container(tree.deployments[deployment])).items():
        if "value" in entry:
            out[name] = entry["value"]
        elif entry["valueFrom"]["secretKeyRef"]["key"] in SECRETS:
            out[name] = SECRETS[entry["valueFrom"]["secretKeyRef"]["key"]]
    return out


class ReadOnlyRootProcess(ServiceProcess):
    """A ServiceProcess started inside read_only_root.sh, with exactly the given environment."""

    def __init__(self, *args: object, model_dir: Path, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.model_dir = model_dir

    def start(self) -> ReadOnlyRootProcess:
        env = {"PATH": os.environ["PATH"], "PYTHONUNBUFFERED": "1", **self.env}
        self.process = subprocess.Popen(
            ["unshare", "-rm", "--propagation", "private", "sh", str(WRAPPER), str(self.model_dir),
             sys.executable, "-m", self.module],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        self.starts += 1
        return self


class ReadOnlyRootGateway(ReadOnlyRootProcess, GatewayProcess):
    def __init__(self, env: dict[str, str], grpc_port: int, http_port: int, model_dir: Path) -> None:
        GatewayProcess.__init__(self, env, grpc_port, http_port)
        self.model_dir = model_dir


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (600, 300), (200, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_services_serve_a_chat_with_a_read_only_root_and_a_tmp_emptydir(rendered, tiny_original):
    tree = rendered["cpu-demo"]
    ports = {name: free_port() for name in ("vision", "llm", "grpc", "http", "ui", "vision-metrics", "llm-metrics")}
    redis = RedisServer(maxmemory="64mb")
    redis.start()
    loopback = {"IVL_VISION_HOST": "127.0.0.1", "IVL_LLM_HOST": "127.0.0.1", "IVL_GATEWAY_GRPC_HOST": "127.0.0.1",
                "IVL_GATEWAY_HTTP_HOST": "127.0.0.1", "IVL_FRONTEND_HOST": "127.0.0.1"}

    def env(service: str, deployment: str, **overrides: str) -> dict[str, str]:
        """The image's ENV, then the manifest's env, then this test's ports and addresses; loopback only."""
        merged = {**_image_env(DOCKERFILES[service]), **_manifest_env(tree, deployment), **overrides}
        return {**merged, **{k: v for k, v in loopback.items() if k in merged}}

    vision = ReadOnlyRootProcess("vision", "ivl_vision", env(
        "vision", "ivl-vision", IVL_VISION_PORT=str(ports["vision"]), IVL_VISION_MODEL_PATH="/srv",
        IVL_VISION_TORCH_THREADS="1", IVL_VISION_METRICS_PORT=str(ports["vision-metrics"]),
    ), ports["vision"], model_dir=tiny_original)
    llm = ReadOnlyRootProcess("llm", "ivl_llm", env(
        "llm", "ivl-llm", IVL_LLM_PORT=str(ports["llm"]), IVL_LLM_MODEL_PATH="/srv", IVL_LLM_TORCH_THREADS="1",
        IVL_LLM_METRICS_PORT=str(ports["llm-metrics"]),
    ), ports["llm"], model_dir=tiny_original)
    # The gateway image runs as `nobody`, whose HOME does not exist: nothing may need it.
    gateway = ReadOnlyRootGateway(env(
        "gateway", "ivl-gateway", HOME="/nonexistent",
        IVL_GATEWAY_VISION_ADDRESSES=vision.address, IVL_GATEWAY_LLM_ADDRESSES=llm.address,
        IVL_GATEWAY_REDIS_URL=redis.url, IVL_GATEWAY_GRPC_PORT=str(ports["grpc"]),
        IVL_GATEWAY_HTTP_PORT=str(ports["http"]),
    ), ports["grpc"], ports["http"], model_dir=tiny_original)
    frontend = ReadOnlyRootProcess("frontend", "ivl_frontend", env(
        "frontend", "ivl-frontend", IVL_FRONTEND_PORT=str(ports["ui"]),
        IVL_FRONTEND_GATEWAY_ADDRESS=gateway.grpc_address,
    ), ports["ui"], model_dir=tiny_original)
    services = [vision, llm, gateway, frontend]
    try:
        for service in services:
            service.start()
        vision.wait_serving()
        llm.wait_serving()
        gateway.wait_ready()
        client = openai.OpenAI(base_url=f"{gateway.http_url}/v1", api_key="client-key", max_retries=0, timeout=120)
        image = "data:image/png;base64," + base64.b64encode(_png()).decode()
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id, max_tokens=4,
            messages=[{"role": "user", "content": [
                {"type": "text", "text": "What is in the picture?"},
                {"type": "image_url", "image_url": {"url": image}},
            ]}],
        )
        assert reply.choices[0].message.content is not None and reply.usage.completion_tokens >= 1
        for name, gauge in (("vision-metrics", "vision_queued_tiles"), ("llm-metrics", "llm_requests_waiting")):
            assert gauge in httpx.get(f"http://127.0.0.1:{ports[name]}/metrics", timeout=10).text  # the manifests' port
        ui = f"http://127.0.0.1:{ports['ui']}"
        for _ in range(600):
            frontend._check_alive()
            try:
                if httpx.get(ui, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        # An upload is written under Gradio's temp dir (/tmp/gradio): the emptyDir must be enough.
        upload = httpx.post(f"{ui}/gradio_api/upload", files={"files": ("cat.png", _png(), "image/png")}, timeout=30)
        assert upload.status_code == 200, upload.text
        (path,) = upload.json()
        assert path.startswith("/tmp/"), path
        for service in services:
            service._check_alive()
    finally:
        for service in services:
            service.stop()
        redis.stop()
