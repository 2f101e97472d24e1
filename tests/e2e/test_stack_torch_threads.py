"""How the launcher runs torch in its two model services: torch's own thread count (every core: one request
alone is fastest so) unless --torch-threads says otherwise, and OMP_WAIT_POLICY=PASSIVE, so that one service's
idle OpenMP threads do not spin on the cores the other needs (bench/bench_stack_threads.py measures both). What
the environment already sets for a service wins."""

from __future__ import annotations

from pathlib import Path

import pytest
from ivl_stack.__main__ import parse_args
from ivl_stack.services import model_specs
from ivl_stack.settings import StackSettings


def envs(settings: StackSettings, env: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    vision, llm = model_specs(settings, Path("/models/x"), env or {})
    return vision.env, llm.env


def test_by_default_torch_picks_the_threads_and_openmp_waits_passively():
    for env in envs(StackSettings()):
        assert not any(name.endswith("_TORCH_THREADS") for name in env)
        assert env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_the_flag_sets_both_services_threads():
    overrides = {k: v for k, v in vars(parse_args(["--torch-threads", "3"])).items() if v is not None}
    vision, llm = envs(StackSettings(**overrides))
    assert vision["IVL_VISION_TORCH_THREADS"] == llm["IVL_LLM_TORCH_THREADS"] == "3"


def test_what_the_environment_sets_wins():
    vision, llm = envs(StackSettings(torch_threads=2), {"IVL_VISION_TORCH_THREADS": "4", "OMP_WAIT_POLICY": "ACTIVE"})
    assert (vision["IVL_VISION_TORCH_THREADS"], llm["IVL_LLM_TORCH_THREADS"]) == ("4", "2")
    assert vision["OMP_WAIT_POLICY"] == llm["OMP_WAIT_POLICY"] == "ACTIVE"


def test_openmps_own_default_can_be_kept(monkeypatch):
    monkeypatch.setenv("IVL_STACK_OMP_WAIT_POLICY", "")
    assert all("OMP_WAIT_POLICY" not in env for env in envs(StackSettings()))


@pytest.mark.parametrize("settings", [{"torch_threads": 0}, {"omp_wait_policy": "sometimes"}])
def test_bad_values_are_refused(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        StackSettings(**settings)
