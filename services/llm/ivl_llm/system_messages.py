"""Which default system message a checkpoint's reference chat() uses.

The reference `chat()` takes the system message of the checkpoint's own `conversation.py` (every
OpenGVLab release in the original layout ships one beside config.json, for trust_remote_code), unless
config.json has `system_message` (InternVL2.5+ code reads it). That file changed in July 2024: since
InternVL2 the templates internlm2-chat, phi3-chat and Hermes-2 share one Chinese system message; in the
InternVL 1.5 era each had its own (`LEGACY_SYSTEM_MESSAGES`).

Resolution, first hit wins (`resolve_system_message`):
1. config.json `system_message`;
2. the checkpoint's conversation.py, read as a syntax tree (never imported or run): the string literal
   `system_message=` of the `Conversation(name=<template>, ...)` it registers;
3. the checkpoint generation told by config.json: `ps_version` "v1" (the pixel-shuffle bug that
   InternVL 1.5 told users to fix with "v2") marks a pre-InternVL2 checkpoint -> the 1.5-era default;
   anything else -> the InternVL2+ default of the template (`Template.system_message`).
The service's own override (IVL_LLM_SYSTEM_MESSAGE) and a request's system message come before all three.
"""

from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ivl_llm.templates import LEGACY_SYSTEM_MESSAGES, get_template

log = logging.getLogger(__name__)

CONVERSATION_FILE = "conversation.py"
MAX_CONVERSATION_BYTES = 1 << 20  # the real files are ~40 KB

GENERATION_INTERNVL1_5 = "internvl1.5"  # InternVL 1.5 era and before
GENERATION_INTERNVL2 = "internvl2"  # InternVL2 and later


@dataclass(frozen=True)
class SystemMessageChoice:
    text: str
    source: str  # "config.json" | "conversation.py" | "internvl1.5 default" | "internvl2 default"


def checkpoint_generation(config: dict[str, Any]) -> str:
    """The checkpoint generation its config.json tells (see the module docstring)."""
    return GENERATION_INTERNVL1_5 if config.get("ps_version") == "v1" else GENERATION_INTERNVL2


def _string(node: ast.expr) -> str | None:
    """A plain string literal's value (the releases write every name and system message so)."""
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def conversation_system_message(source: str, template_name: str) -> str | None:
    """The literal system_message of `Conversation(name=template_name, ...)` in conversation.py's text;
    None when the file has no such call with a plain string literal (or is not valid Python)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    found: str | None = None
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "Conversation"):
            continue
        values = {k.arg: k.value for k in node.keywords if k.arg}
        name = _string(values["name"]) if "name" in values else None
        if name != template_name or "system_message" not in values:
            continue
        found = _string(values["system_message"])  # a later registration overrides, as in the reference
    return found


def read_conversation_system_message(folder: Path, template_name: str) -> str | None:
    path = folder / CONVERSATION_FILE
    try:
        if not path.is_file() or path.stat().st_size > MAX_CONVERSATION_BYTES:
            return None
        return conversation_system_message(path.read_text(encoding="utf-8", errors="replace"), template_name)
    except OSError as error:
        log.warning("could not read %s: %s", path, error)
        return None


def resolve_system_message(folder: Path, config: dict[str, Any], template_name: str) -> SystemMessageChoice:
    configured = config.get("system_message")
    if isinstance(configured, str):
        return SystemMessageChoice(configured, "config.json")
    shipped = read_conversation_system_message(folder, template_name)
    if shipped is not None:
        return SystemMessageChoice(shipped, CONVERSATION_FILE)
    generation = checkpoint_generation(config)
    if generation == GENERATION_INTERNVL1_5 and template_name in LEGACY_SYSTEM_MESSAGES:
        return SystemMessageChoice(LEGACY_SYSTEM_MESSAGES[template_name], f"{generation} default")
    return SystemMessageChoice(get_template(template_name).system_message, f"{GENERATION_INTERNVL2} default")
