"""The one settings-error formatter (ivl_proto.settings_errors) over the real settings classes of every service."""

from __future__ import annotations

import pytest
from ivl_frontend.settings import FrontendSettings
from ivl_gateway.settings import GatewaySettings
from ivl_llm.settings import LLMSettings
from ivl_proto.settings_errors import SettingsError, load_settings
from ivl_stack.settings import StackSettings
from ivl_vision.settings import VisionSettings
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class DemoSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IVL_DEMO_", extra="forbid")

    tiles: int = Field(12, ge=1, le=40)
    ratio: float = 0.5
    enabled: bool = True
    mode: str = Field("a", pattern="^[ab]$")


def _message(settings_class: type[BaseSettings], service: str, cli: tuple[str, ...] = (), **overrides: object) -> str:
    with pytest.raises(SettingsError) as caught:
        load_settings(settings_class, service, cli, **overrides)
    return str(caught.value)


def test_one_line_per_bad_setting_named_by_its_env_var(monkeypatch):
    monkeypatch.setenv("IVL_DEMO_TILES", "abc")
    monkeypatch.setenv("IVL_DEMO_RATIO", "half")
    monkeypatch.setenv("IVL_DEMO_ENABLED", "maybe")
    lines = _message(DemoSettings, "demo").splitlines()
    assert lines == [
        "invalid demo settings (IVL_DEMO_*):",
        "  IVL_DEMO_TILES=abc: not an integer",
        "  IVL_DEMO_RATIO=half: not a number",
        "  IVL_DEMO_ENABLED=maybe: not a boolean (true/false, 1/0, yes/no, on/off)",
    ]


def test_bounds_unknown_fields_and_flags(monkeypatch):
    monkeypatch.setenv("IVL_DEMO_TILES", "41")
    assert "  IVL_DEMO_TILES=41: must be less than or equal to 40" in _message(DemoSettings, "demo").splitlines()
    monkeypatch.delenv("IVL_DEMO_TILES")
    assert _message(DemoSettings, "demo", ("tiles",), tiles=0).splitlines()[1] == (
        "  --tiles=0: must be greater than or equal to 1")  # it came from a command-line flag
    assert "IVL_DEMO_COLOUR=red: not a setting of this service" in _message(DemoSettings, "demo", colour="red")
    assert _message(DemoSettings, "demo", mode="c").splitlines()[1].startswith("  IVL_DEMO_MODE=c: String should match")


def test_good_settings_come_back_built(monkeypatch):
    monkeypatch.setenv("IVL_DEMO_TILES", "7")
    assert load_settings(DemoSettings, "demo").tiles == 7


def test_every_service_reports_through_it(monkeypatch, tmp_path):
    monkeypatch.setenv("IVL_VISION_MODEL_PATH", str(tmp_path))
    monkeypatch.setenv("IVL_VISION_MAX_TILES", "abc")
    assert "  IVL_VISION_MAX_TILES=abc: not an integer" in _message(VisionSettings, "vision encoder").splitlines()
    monkeypatch.setenv("IVL_VISION_MAX_TILES", "4")
    monkeypatch.setenv("IVL_VISION_MIN_TILES", "6")
    assert "min_tiles (6) is larger than max_tiles (4)" in _message(VisionSettings, "vision encoder")
    monkeypatch.setenv("IVL_LLM_PORT", "x")
    assert "  IVL_LLM_PORT=x: not an integer" in _message(LLMSettings, "LLM").splitlines()
    monkeypatch.setenv("IVL_GATEWAY_HTTP_PORT", "not-a-port")
    assert "  IVL_GATEWAY_HTTP_PORT=not-a-port: not an integer" in _message(GatewaySettings, "gateway").splitlines()
    monkeypatch.setenv("IVL_FRONTEND_MAX_TILES", "99")
    assert ("  IVL_FRONTEND_MAX_TILES=99: must be less than or equal to 40"
            in _message(FrontendSettings, "UI").splitlines())
    assert "  --ui-port=abc: not an integer" in _message(StackSettings, "stack launcher", ("ui_port",),
                                                          ui_port="abc").splitlines()
