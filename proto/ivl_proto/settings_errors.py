"""The one way every service reports settings it cannot start with: one line per bad setting,
named as the person set it, with its value and a short reason, e.g.

    invalid vision encoder settings (IVL_VISION_*):
      IVL_VISION_MAX_TILES=abc: not an integer
      IVL_VISION_PORT=70000: must be less than or equal to 65535

`load_settings(SettingsClass, "vision encoder", **overrides)` builds a pydantic-settings object and turns
pydantic's ValidationError into a SettingsError with that text; `python -m <service>` prints it and exits 2.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

S = TypeVar("S", bound=BaseModel)

# pydantic error type -> what a person reads (types not listed keep pydantic's own message)
_REASONS = {
    "int_parsing": "not an integer",
    "int_from_float": "not an integer",
    "int_type": "not an integer",
    "float_parsing": "not a number",
    "float_type": "not a number",
    "finite_number": "not a finite number",
    "bool_parsing": "not a boolean (true/false, 1/0, yes/no, on/off)",
    "bool_type": "not a boolean (true/false, 1/0, yes/no, on/off)",
    "missing": "required but not set",
    "extra_forbidden": "not a setting of this service",
    "path_not_directory": "not a folder",
    "path_not_file": "not a file",
    "json_invalid": "not valid JSON",
    "list_type": "not a list",
}
_BOUNDS = {"greater_than_equal": ("ge", "greater than or equal to"), "less_than_equal": ("le", "less than or equal to"),
           "greater_than": ("gt", "greater than"), "less_than": ("lt", "less than")}
_SHOWN_TYPES = (str, int, float, bool)


class SettingsError(ValueError):
    """Settings that cannot start the service; the message lists every bad setting by the name it was set under."""


def reason(item: Mapping[str, Any]) -> str:
    """The short reason of one pydantic error item."""
    kind = str(item.get("type", ""))
    ctx = item.get("ctx") or {}
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        return f"must be {words} {ctx.get(key)}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "value_error":
        return str(ctx.get("error") or item.get("msg", "invalid"))
    return _REASONS.get(kind) or str(item.get("msg", "invalid"))


def setting_name(field: str, env_prefix: str, cli_fields: Collection[str] = ()) -> str:
    """How the person named the setting: `--ui-port` when it came from a command-line flag, else the env var."""
    if field in cli_fields:
        return "--" + field.replace("_", "-")
    if field.isupper():  # an alias that is already an env var name (e.g. MODEL_PATH)
        return field
    return f"{env_prefix}{field.upper()}"


def describe_settings_error(
    error: ValidationError, env_prefix: str, service: str, cli_fields: Collection[str] = ()
) -> str:
    """A title line, then one line per bad setting: `NAME=value: reason` (`NAME: reason` when the value
    is not a plain one); errors of the whole object (cross-field checks) as their own message."""
    lines = [f"invalid {service} settings ({env_prefix}*):"]
    for item in error.errors():
        loc = item.get("loc") or ()
        why = reason(item)
        if not loc:
            lines.append(f"  {why}")
            continue
        name = setting_name(str(loc[0]), env_prefix, cli_fields)
        value = item.get("input")
        if item.get("type") == "missing" or not isinstance(value, _SHOWN_TYPES):
            lines.append(f"  {name}: {why}")
        else:
            lines.append(f"  {name}={value}: {why}")
    return "\n".join(lines)


def load_settings(
    settings_class: type[S], service: str, cli_fields: Collection[str] = (), **overrides: Any
) -> S:
    """`settings_class(**overrides)` (pydantic-settings reads its env vars); bad settings -> SettingsError.
    `cli_fields` names the overrides that came from command-line flags (reported as `--flag=value`)."""
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    try:
        return settings_class(**overrides)
    except ValidationError as error:
        raise SettingsError(describe_settings_error(error, prefix, service, cli_fields)) from error
