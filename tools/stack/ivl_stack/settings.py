"""StackSettings: what the one-command launcher starts and where (env prefix IVL_STACK_, MODEL_PATH)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PORT_FIELDS = (
    "ui_port", "http_port", "grpc_port", "vision_port", "llm_port", "redis_port", "metrics_port", "vision_metrics_port",
    "llm_metrics_port",
)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "ivl-stack"


class StackSettings(BaseSettings):
    """Everything `python -m ivl_stack` can be told; flags override IVL_STACK_* variables."""

    model_config = SettingsConfigDict(env_prefix="IVL_STACK_", extra="ignore", populate_by_name=True)

    # A checkpoint folder (original OpenGVLab or transformers-native layout). Empty = the trained tiny demo
    # model committed under models/ (or, with random_demo or where it is missing, the tiny random
    # checkpoint, written once under cache_dir).
    model_path: str = Field("", validation_alias=AliasChoices("model_path", "MODEL_PATH", "IVL_STACK_MODEL_PATH"))
    random_demo: bool = False
    cache_dir: Path = Field(default_factory=default_cache_dir)
    host: str = Field("127.0.0.1", description="where the UI and the gateway's HTTP API listen (0.0.0.0 = all)")
    ui_port: int = Field(7860, ge=1, le=65535)
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(50050, ge=1, le=65535)
    vision_port: int = Field(50051, ge=1, le=65535)
    llm_port: int = Field(50052, ge=1, le=65535)
    redis_port: int = Field(6390, ge=1, le=65535)
    # Prometheus metrics of the vision and LLM services (on the internal host, like their gRPC ports); 0 = off.
    vision_metrics_port: int = Field(9091, ge=0, le=65535)
    llm_metrics_port: int = Field(9092, ge=0, le=65535)
    # The vision and LLM services listen here (loopback: only this machine reaches them) and take calls only
    # with this token, which the launcher hands to the gateway; a new random one per run unless set.
    internal_host: str = "127.0.0.1"
    internal_token: str = Field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    metrics_port: int = Field(9400, ge=0, le=65535)  # the launcher's own /metrics (loopback); 0 = off
    # Redis embedding cache: a memory cap with LRU eviction, no persistence.
    redis_maxmemory: str = "1gb"
    redis_server: str = "redis-server"
    # Model execution. gpu = cuda + bfloat16 for both services and LMDeploy for the LLM.
    gpu: bool = False
    backend: Literal["transformers", "lmdeploy"] | None = None
    device: Literal["cpu", "cuda"] | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    trust_remote_code: bool = False
    # torch intra-op threads of each model service; None = torch's default (every core: one request alone runs
    # fastest so; the two services share the cores without spinning, see model_specs).
    torch_threads: int | None = Field(None, ge=1)
    # OMP_WAIT_POLICY of both model services (an OMP_WAIT_POLICY in the environment wins); "" = OpenMP's own
    # default (spin a while after each parallel region).
    omp_wait_policy: Literal["PASSIVE", "ACTIVE", ""] = "PASSIVE"
    # UI options passed on to ivl_frontend.
    share: bool = False
    auth: str = ""
    # Start-up and shutdown.
    ready_timeout_s: float = Field(900.0, gt=0)
    stop_grace_s: float = Field(10.0, ge=0)
    ready_file: Path | None = None  # JSON with the URLs and child pids, written when everything is up
    no_ui: bool = False
    # Once the stack is up, a child that dies is restarted after restart_backoff_s, doubling each time
    # (at most restart_max_backoff_s); one restarted max_restarts times within restart_window_s is
    # given up while the rest keeps serving.
    restart_backoff_s: float = Field(1.0, ge=0)
    restart_max_backoff_s: float = Field(30.0, ge=0)
    max_restarts: int = Field(5, ge=0)
    restart_window_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> StackSettings:
        used: dict[int, str] = {}
        for name in PORT_FIELDS:
            port = getattr(self, name)
            if port and port in used:
                raise ValueError(f"{name} and {used[port]} are both {port}; give each service its own port")
            used[port] = name
        if self.backend == "lmdeploy" and self.resolved_device() != "cuda":
            raise ValueError("the lmdeploy backend needs a GPU: add --gpu (or --device cuda)")
        return self

    def resolved_device(self) -> str:
        return self.device or ("cuda" if self.gpu else "cpu")

    def resolved_backend(self) -> str:
        return self.backend or ("lmdeploy" if self.gpu else "transformers")

    def resolved_dtype(self) -> str:
        return self.dtype or ("bfloat16" if self.resolved_device() == "cuda" else "float32")

    def connect_host(self) -> str:
        """Where the launcher and the UI reach the listeners (0.0.0.0 is not an address to dial)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
