"""The images the overlays run: the vision and LLM Dockerfiles' `demo` target bakes the seeded demo checkpoint
into /models/current (the same bytes in both images) while the default target stays model-free; docs/deploy.md
builds exactly the tags the overlays use."""

from __future__ import annotations

import re
import subprocess
import sys
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


def _writer_command(dockerfile: str) -> str:
    (checkpoint,) = [s for s in _stages(dockerfile) if s[1] == "demo-checkpoint"]
    (run,) = [line for line in checkpoint[2] if line.startswith("RUN ") and "ivl_tiny" in line]
    return run.rsplit("&&", 1)[1].strip()


@pytest.mark.parametrize("dockerfile", list(MODEL_DOCKERFILES.values()))
def test_the_demo_target_bakes_the_model_and_the_default_target_does_not(dockerfile):
    stages = _stages(dockerfile)
    names = [name for _, name, _ in stages]
    assert names == ["service", "demo-checkpoint", "demo", None], names
    last_from, _, last_body = stages[-1]
    assert last_from == "service" and not last_body, "the default build is the service without a model"
    demo_from, _, demo_body = stages[2]
    assert demo_from == "service"
    assert demo_body == ["COPY --from=demo-checkpoint /demo-model /models/current"]
    service_env = " ".join(line for line in stages[0][2] if line.startswith("ENV "))
    assert "MODEL_PATH=/models/current" in service_env
    assert re.search(r"ivl_tiny --out /demo-model$", _writer_command(dockerfile))


@pytest.mark.slow
def test_both_model_images_write_the_same_checkpoint(tmp_path, tiny_original):
    """The Dockerfiles' writer command, run here, gives byte for byte the checkpoint an independent write
    of the same seeded spec gives (the tests' tiny_original): the writer is deterministic, so the vision and
    LLM images, built apart, carry the same weights."""
    commands = {_writer_command(f).split(" ", 1)[1] for f in MODEL_DOCKERFILES.values()}
    (command,) = commands  # the same arguments after the interpreter (python / python3)
    out = tmp_path / "demo-model"
    argv = command.replace("/demo-model", str(out)).split()
    assert argv[:2] == ["-m", "ivl_tiny"]
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tiny_original) for p in tiny_original.rglob("*") if p.is_file())
    assert any(p.name == "config.json" for p in files) and any(p.suffix == ".safetensors" for p in files)
    for relative in files:
        assert (out / relative).read_bytes() == (tiny_original / relative).read_bytes(), relative


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
