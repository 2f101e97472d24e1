"""What the launcher runs: the command, environment and readiness probe of each child, in start order."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ivl_stack.readiness import Probe, grpc_health_probe, http_probe, redis_probe
from ivl_stack.settings import StackSettings


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    probe: Probe
    endpoint: str


def _env(base: Mapping[str, str], **values: object) -> dict[str, str]:
    env = dict(base)
    env.update({k: str(v) for k, v in values.items() if v is not None})
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _unless_set(base: Mapping[str, str], name: str, value: object) -> object:
    """`value`, unless the environment already sets `name` (a service's own variable wins)."""
    return None if name in base else value


def redis_spec(settings: StackSettings, base_env: Mapping[str, str]) -> ServiceSpec:
    binary = shutil.which(settings.redis_server)
    if binary is None:
        raise FileNotFoundError(
            f"{settings.redis_server} not found; install it (`sudo apt-get install redis-server`) "
            "or run scripts/run_stack.sh, which installs it"
        )
    host = settings.internal_host  # the cache has no password: never on a public address by default
    argv = [
        binary, "--bind", host, "--port", str(settings.redis_port), "--save", "", "--appendonly", "no",
        "--maxmemory", settings.redis_maxmemory, "--maxmemory-policy", "allkeys-lru", "--protected-mode", "no",
    ]
    return ServiceSpec("redis", argv, _env(base_env), redis_probe(host, settings.redis_port),
                       f"redis://{host}:{settings.redis_port}/0")


def model_specs(settings: StackSettings, model_path: Path, base_env: Mapping[str, str]) -> list[ServiceSpec]:
    """The vision encoder and the LLM service (started together: both load weights). They bind to
    `internal_host` (loopback by default, whatever --host says) and require the run's internal token."""
    host = settings.internal_host
    token = settings.internal_token
    device, dtype = settings.resolved_device(), settings.resolved_dtype()
    threads = settings.torch_threads
    # Both services' torch threads take every core by default, and OpenMP's threads spin for a while after each
    # parallel region: a service's spinning threads then take the cores the other service needs (8 clients,
    # bench/bench_stack_threads.py). PASSIVE makes them sleep at once; a new image alone is as fast there.
    wait_policy = _unless_set(base_env, "OMP_WAIT_POLICY", settings.omp_wait_policy or None)
    vision_env = _env(base_env, IVL_VISION_MODEL_PATH=model_path, IVL_VISION_HOST=host,
                      IVL_VISION_PORT=settings.vision_port, IVL_VISION_DEVICE=device, IVL_VISION_DTYPE=dtype,
                      IVL_VISION_AUTH_TOKEN=token, IVL_VISION_METRICS_PORT=settings.vision_metrics_port,
                      IVL_VISION_TORCH_THREADS=_unless_set(base_env, "IVL_VISION_TORCH_THREADS", threads),
                      OMP_WAIT_POLICY=wait_policy)
    llm_env = _env(base_env, IVL_LLM_MODEL_PATH=model_path, IVL_LLM_HOST=host, IVL_LLM_PORT=settings.llm_port,
                   IVL_LLM_AUTH_TOKEN=token, IVL_LLM_METRICS_PORT=settings.llm_metrics_port,
                   IVL_LLM_DEVICE=device, IVL_LLM_DTYPE=dtype, IVL_LLM_BACKEND=settings.resolved_backend(),
                   IVL_LLM_TRUST_REMOTE_CODE="true" if settings.trust_remote_code else None,
                   IVL_LLM_TORCH_THREADS=_unless_set(base_env, "IVL_LLM_TORCH_THREADS", threads),
                   OMP_WAIT_POLICY=wait_policy)
    vision_addr, llm_addr = f"{host}:{settings.vision_port}", f"{host}:{settings.llm_port}"
    return [
        ServiceSpec("vision", [sys.executable, "-m", "ivl_vision"], vision_env, grpc_health_probe(vision_addr),
                    vision_addr),
        ServiceSpec("llm", [sys.executable, "-m", "ivl_llm"], llm_env, grpc_health_probe(llm_addr), llm_addr),
    ]


def gateway_spec(settings: StackSettings, redis_url: str, base_env: Mapping[str, str]) -> ServiceSpec:
    host = settings.connect_host()
    internal = settings.internal_host
    env = _env(
        base_env,
        IVL_GATEWAY_VISION_ADDRESSES=f"{internal}:{settings.vision_port}",
        IVL_GATEWAY_LLM_ADDRESSES=f"{internal}:{settings.llm_port}",
        IVL_GATEWAY_INTERNAL_TOKEN=settings.internal_token,
        IVL_GATEWAY_REDIS_URL=redis_url,
        IVL_GATEWAY_GRPC_HOST=settings.host,
        IVL_GATEWAY_GRPC_PORT=settings.grpc_port,
        IVL_GATEWAY_HTTP_HOST=settings.host,
        IVL_GATEWAY_HTTP_PORT=settings.http_port,
    )
    http = f"http://{host}:{settings.http_port}"
    return ServiceSpec("gateway", [sys.executable, "-m", "ivl_gateway"], env, http_probe(f"{http}/ready"), http)


def frontend_spec(settings: StackSettings, base_env: Mapping[str, str]) -> ServiceSpec:
    host = settings.connect_host()
    env = _env(
        base_env,
        IVL_FRONTEND_GATEWAY_ADDRESS=f"{host}:{settings.grpc_port}",
        IVL_FRONTEND_HOST=settings.host,
        IVL_FRONTEND_PORT=settings.ui_port,
        IVL_FRONTEND_SHARE=settings.share,
        IVL_FRONTEND_AUTH=settings.auth or None,
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    url = f"http://{host}:{settings.ui_port}"
    return ServiceSpec("ui", [sys.executable, "-m", "ivl_frontend"], env, http_probe(f"{url}/"), url)
