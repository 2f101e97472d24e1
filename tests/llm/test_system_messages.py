"""The default system message per checkpoint: config.json, the checkpoint's own conversation.py (read, never
run), else its generation (ps_version "v1" = InternVL 1.5 era and before); overrides come first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ivl_llm.checkpoint import read_checkpoint
from ivl_llm.system_messages import conversation_system_message, read_conversation_system_message
from ivl_llm.templates import INTERNVL2_SYSTEM_MESSAGE, LEGACY_SYSTEM_MESSAGES

# The shape of a release's conversation.py (our own text): templates registered through
# register_conv_template(Conversation(name=..., system_message=..., ...)), plus unrelated code.
CONVERSATION_PY = '''
import dataclasses
SHIPPED = "should never run"
raise RuntimeError("this file must be parsed, not executed")

register_conv_template(
    Conversation(
        name='Hermes-2',
        system_template='<|im_start|>system\\n{system_message}',
        system_message='Hermes message of this release.',
        sep='<|im_end|>',
    )
)
register_conv_template(
    Conversation(
        name='internlm2-chat',
        system_template='<|im_start|>system\\n{system_message}',
        # note: a commented-out variant is not a value
        system_message='InternLM2 message of this release.',
        sep='<|im_end|>',
    )
)
register_conv_template(Conversation(name='phi3-chat', system_message=SHIPPED))
'''


def with_config(folder: Path, tmp_path: Path, name: str, **fields: object) -> Path:
    target = tmp_path / name
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config.update(fields)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_conversation_py_literal_for_the_template():
    assert conversation_system_message(CONVERSATION_PY, "internlm2-chat") == "InternLM2 message of this release."
    assert conversation_system_message(CONVERSATION_PY, "Hermes-2") == "Hermes message of this release."
    assert conversation_system_message(CONVERSATION_PY, "phi3-chat") is None  # not a literal: not guessed
    assert conversation_system_message(CONVERSATION_PY, "internvl2_5") is None
    assert conversation_system_message("def broken(:\n", "internlm2-chat") is None


def test_a_later_registration_overrides_like_the_reference_registry():
    source = CONVERSATION_PY + "\nregister_conv_template(Conversation(name='Hermes-2', system_message='later'), True)\n"
    assert conversation_system_message(source, "Hermes-2") == "later"


def test_ps_version_v1_checkpoints_get_the_1_5_era_default(tiny_original, tmp_path):
    legacy = read_checkpoint(with_config(tiny_original, tmp_path, "v1", ps_version="v1"))
    assert legacy.system_message == LEGACY_SYSTEM_MESSAGES["internlm2-chat"]
    assert legacy.system_message_source == "internvl1.5 default"
    hermes = read_checkpoint(with_config(tiny_original, tmp_path, "v1-hermes", ps_version="v1", template="Hermes-2"))
    assert hermes.system_message == "Answer the questions."


def test_internvl2_era_checkpoints_get_the_chinese_default(tiny_original, tiny_qwen2_original):
    current = read_checkpoint(tiny_original)  # ps_version v2, no conversation.py
    assert current.system_message == INTERNVL2_SYSTEM_MESSAGE
    assert current.system_message_source == "internvl2 default"
    assert read_checkpoint(tiny_qwen2_original, template="Hermes-2").system_message == INTERNVL2_SYSTEM_MESSAGE


def test_the_checkpoints_conversation_py_wins_over_the_generation(tiny_original, tmp_path):
    folder = with_config(tiny_original, tmp_path, "shipped", ps_version="v1")
    (folder / "conversation.py").write_text(CONVERSATION_PY)
    assert read_conversation_system_message(folder, "internlm2-chat") == "InternLM2 message of this release."
    checkpoint = read_checkpoint(folder)
    assert (checkpoint.system_message, checkpoint.system_message_source) == (
        "InternLM2 message of this release.", "conversation.py"
    )


@pytest.mark.parametrize("configured", ["From config.json.", ""])
def test_config_json_system_message_wins_and_the_override_beats_everything(tiny_original, tmp_path, configured):
    folder = with_config(tiny_original, tmp_path, "configured", system_message=configured)
    (folder / "conversation.py").write_text(CONVERSATION_PY)
    assert read_checkpoint(folder).system_message == configured
    overridden = read_checkpoint(folder, system_message="Operator's choice.")
    assert (overridden.system_message, overridden.system_message_source) == ("Operator's choice.", "override")
