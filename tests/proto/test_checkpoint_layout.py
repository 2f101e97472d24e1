"""The one checkpoint-layout detector (ivl_proto.checkpoint_layout), on written checkpoints of both layouts
and on configs that are neither; both model services read their layout through it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ivl_proto.checkpoint_layout import detect_layout, read_checkpoint_config
from ivl_proto.errors import ErrorCode, ServingError


@pytest.fixture
def checkpoints(tiny_original: Path, tiny_native: Path) -> dict[str, Path]:
    return {"original": tiny_original, "native": tiny_native}


@pytest.mark.parametrize("layout", ["original", "native"])
def test_written_checkpoints_are_told_apart(checkpoints, layout):
    raw = read_checkpoint_config(checkpoints[layout])
    assert detect_layout(raw) == layout


def test_the_vision_and_llm_readers_agree_with_it(checkpoints):
    from ivl_llm.checkpoint import read_checkpoint
    from ivl_vision.checkpoint_config import read_config

    for layout, folder in checkpoints.items():
        assert read_config(folder).layout == layout
        assert read_checkpoint(folder).layout == layout


@pytest.mark.parametrize(("raw", "layout"), [
    ({"architectures": ["InternVLChatModel"]}, "original"),
    ({"architectures": ["InternVLForConditionalGeneration"], "llm_config": {}}, "native"),  # architectures win
    ({"architectures": ["InternVLModel"]}, "native"),
    ({"vision_config": {}, "llm_config": {}}, "original"),
    ({"vision_config": {}, "text_config": {}}, "native"),
])
def test_architectures_first_then_sections(raw, layout):
    assert detect_layout(raw) == layout


def test_neither_layout_is_a_clear_error():
    with pytest.raises(ServingError) as caught:
        detect_layout({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}, "/m/config.json")
    assert caught.value.code is ErrorCode.FAILED_PRECONDITION
    assert "/m/config.json is neither an OpenGVLab InternVL config" in caught.value.message
    assert "LlamaForCausalLM" in caught.value.message


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(ServingError, match="is not a folder") as caught:
        read_checkpoint_config(tmp_path / "nowhere")
    assert caught.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(ServingError, match=r"has no config\.json"):
        read_checkpoint_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ServingError, match=r"cannot read .*config\.json") as caught:
        read_checkpoint_config(tmp_path)
    assert caught.value.code is ErrorCode.FAILED_PRECONDITION
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ServingError, match="is not a JSON object"):
        read_checkpoint_config(tmp_path)


def test_an_llm_config_without_its_language_model_section_is_refused(tmp_path):
    from ivl_llm.checkpoint import read_checkpoint

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"], "vision_config": {}}))
    with pytest.raises(ServingError, match="original layout without its llm_config section"):
        read_checkpoint(tmp_path)
