"""The images the overlays run: the vision and LLM Dockerfiles' `demo` target bakes the committed trained demo
model into /models/current (the same folder in both images, not excluded by .dockerignore) while the default
target stays model-free; docs/deploy.md builds exactly the tags the overlays use."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from k8s_render import OVERLAYS, ROOT, main_container

MODEL_DOCKERFILES = {
    "internvl-serve/vision-encoder": "services/vision_encoder/Dockerfile",
    "internvl-serve/llm": "services/llm/Dockerfile",
}
DOCKERFILES = {
    **MODEL_DOCKERFILES,
    "internvl-serve/gateway": "gateway/Dockerfile",
    "internvl-serve/frontend": "frontend/Dockerfile",
}


def _stages(dockerfile: str) -> list[tuple[str, str | None, list[str]]]:
    """(FROM image, stage name or None, the stage's instructions) in order."""
    stages: list[tuple[str, str | None, list[str]]] = []
    text = (ROOT / dockerfile).read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"FROM (\S+)(?: AS (\S+))?", line)
        if match:
            stages.append((match.group(1), match.group(2), []))
        elif stages:
            stages[-1][2].append(line)
    return stages


def _copied_model(dockerfile: str) -> str:
    """The repository folder the demo stage copies to /models/current."""
    (demo,) = [s for s in _stages(dockerfile) if s[1] == "demo"]
    (copy,) = demo[2]
    match = re.fullmatch(r"COPY (\S+?)/? /models/current/?", copy)
    assert match, copy
    return match.group(1)


@pytest.mark.parametrize("dockerfile", list(MODEL_DOCKERFILES.values()))
def test_the_demo_target_bakes_the_model_and_the_default_target_does_not(dockerfile):
    stages = _stages(dockerfile)
    names = [name for _, name, _ in stages]
    # Build-only stages (the vision image's compiled kernel) may come first; the service image only copies from them.
    builders = names[:-3]
    assert names[-3:] == ["service", "demo", None], names
    assert all(name for name in builders), names
    last_from, _, last_body = stages[-1]
    assert last_from == "service" and not last_body, "the default build is the service without a model"
    demo_from, _, demo_body = stages[-2]
    assert demo_from == "service"
    assert demo_body == ["COPY models/tiny-internvl-demo/ /models/current/"]
    service_from, _, service_body = stages[-3]
    assert service_from not in builders, "the service image starts clean, not from a build stage"
    for line in service_body:
        source = re.match(r"COPY --from=(\S+)", line)
        assert not source or source.group(1) in builders, line
    service_env = " ".join(line for line in service_body if line.startswith("ENV "))
    assert "MODEL_PATH=/models/current" in service_env


def test_both_model_images_copy_the_committed_demo_model():
    """Both images copy one folder: the trained demo model the launcher serves by default (so the vision and
    LLM images, built apart, carry the same weights), and the build context keeps it (.dockerignore)."""
    from ivl_stack.tiny_model import TRAINED_DEMO_MODEL

    (folder,) = {_copied_model(f) for f in MODEL_DOCKERFILES.values()}
    assert ROOT / folder == TRAINED_DEMO_MODEL
    config = json.loads((ROOT / folder / "config.json").read_text())
    assert config["ivl_demo_model"] is True
    assert any(p.suffix == ".safetensors" for p in (ROOT / folder).iterdir())
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "models" in ignore and f"!{folder}" in ignore


def _doc_builds() -> dict[str, str]:
    """tag -> the docker build command docs/deploy.md gives for it."""
    text = (ROOT / "docs" / "deploy.md").read_text().replace("\\\n", " ")
    builds = {}
    for line in text.splitlines():
        if line.startswith("docker build "):
            tag = re.search(r" -t (\S+)", line).group(1)
            builds[tag] = line
    return builds


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_docs_build_every_project_image_the_overlay_runs(rendered, name):
    builds = _doc_builds()
    for deployment in rendered[name].deployments.values():
        image = main_container(deployment)["image"]
        repository = image.rpartition(":")[0]
        if repository not in DOCKERFILES:
            continue
        assert image in builds, f"docs/deploy.md has no `docker build ... -t {image}`"
        command = builds[image]
        assert f"-f {DOCKERFILES[repository]} " in command, command
        assert ("--target demo" in command) == image.endswith("-demo"), command
        assert Path(ROOT / DOCKERFILES[repository]).exists()
