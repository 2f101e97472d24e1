"""Strict schema validation of every rendered tree with kubernetes-validate (the Kubernetes OpenAPI schemas,
bundled: offline): unknown fields, wrong types and missing required fields fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from k8s_render import TREES

# The oldest Kubernetes the manifests are written for (native preStop sleep is on by default from 1.30,
# grpc probes are GA from 1.27) and the newest schema bundled with the validator.
VERSIONS = ("1.31.0", "1.37.0")


def _validator() -> str:
    path = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent))
    assert path, "kubernetes-validate is not installed (requirements-dev.txt; scripts/setup_env.sh installs it)"
    return path


def _validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_validator(), "--strict", "-k", version, str(path)], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", list(TREES))
def test_every_resource_passes_strict_validation(rendered, name, version, tmp_path):
    tree = rendered[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(tree.text)
    result = _validate(path, version)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    passed = [line for line in output.splitlines() if " passed for resource " in line]
    assert len(passed) == len(tree.docs), f"every resource must be checked, not skipped:\n{output}"


def test_the_validator_rejects_an_unknown_field_and_a_named_grpc_probe_port(rendered, tmp_path):
    """The check above can fail: a misspelt field and a grpc probe by port name are refused."""
    text = rendered["cpu-demo"].text
    typo = tmp_path / "typo.yaml"
    typo.write_text(text.replace("imagePullPolicy: IfNotPresent", "imagePullPolicy: IfNotPresent\n        imagePulPolicy: Always", 1))
    result = _validate(typo, VERSIONS[0])
    assert result.returncode != 0 and "imagePulPolicy" in result.stdout + result.stderr
    named = tmp_path / "named-port.yaml"
    named.write_text(text.replace("grpc:\n            port: 50051", "grpc:\n            port: grpc", 1))
    assert named.read_text() != text
    result = _validate(named, VERSIONS[0])
    assert result.returncode != 0 and "is not of type 'integer'" in result.stdout + result.stderr
