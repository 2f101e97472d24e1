"""The launcher keeps the internal services off the network: vision, LLM and Redis bind to loopback
whatever --host is, and one random token per run goes to both services and the gateway."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from ivl_stack.services import gateway_spec, model_specs, redis_spec
from ivl_stack.settings import StackSettings


def specs(settings: StackSettings) -> dict[str, dict[str, str]]:
    models = model_specs(settings, Path("/models/x"), {})
    gateway = gateway_spec(settings, "redis://127.0.0.1:6390/0", {})
    return {spec.name: spec.env for spec in [*models, gateway]}


def test_internal_services_bind_to_loopback_with_a_public_host():
    envs = specs(StackSettings(host="0.0.0.0"))
    assert envs["vision"]["IVL_VISION_HOST"] == "127.0.0.1"
    assert envs["llm"]["IVL_LLM_HOST"] == "127.0.0.1"
    assert envs["gateway"]["IVL_GATEWAY_HTTP_HOST"] == "0.0.0.0"  # only the public parts move
    assert envs["gateway"]["IVL_GATEWAY_VISION_ADDRESSES"].startswith("127.0.0.1:")
    if shutil.which("redis-server"):
        argv = redis_spec(StackSettings(host="0.0.0.0"), {}).argv
        assert argv[argv.index("--bind") + 1] == "127.0.0.1"


def test_one_random_token_per_run_reaches_all_three():
    first, second = specs(StackSettings()), specs(StackSettings())
    token = first["vision"]["IVL_VISION_AUTH_TOKEN"]
    assert len(token) >= 32
    assert first["llm"]["IVL_LLM_AUTH_TOKEN"] == token == first["gateway"]["IVL_GATEWAY_INTERNAL_TOKEN"]
    assert second["vision"]["IVL_VISION_AUTH_TOKEN"] != token
    assert token not in repr(StackSettings(internal_token=token))


@pytest.mark.parametrize("token", ["fixed-token-from-env"])
def test_the_token_can_be_set(monkeypatch, token):
    monkeypatch.setenv("IVL_STACK_INTERNAL_TOKEN", token)
    assert specs(StackSettings())["gateway"]["IVL_GATEWAY_INTERNAL_TOKEN"] == token
